"""Per-worker caches: loaded engines kept warm, and prompt embeddings a catalog repeats.

`LRUCache` is size-bounded and thread-safe. A value leaving it (evicted, replaced, cleared) is
released: its `close()` runs when it has one, which for an engine frees its GPU memory. Creating a
missing value happens outside the lock, so a slow model load never blocks readers of other keys.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def release(value: object) -> None:
    """Call the value's `close()` if it has one: the default when a value leaves a cache."""
    close = getattr(value, "close", None)
    if callable(close):
        close()


class LRUCache(Generic[K, V]):
    """At most `capacity` values; past it the least recently used one is evicted and released."""

    def __init__(self, capacity: int, on_evict: Callable[[V], None] = release) -> None:
        if capacity < 1:
            raise ValueError("an LRU cache holds at least one value")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def keys(self) -> list[K]:
        """Keys from least to most recently used: the first is evicted next."""
        with self._lock:
            return list(self._items)

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._items:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: K, value: V) -> None:
        with self._lock:
            dropped = self._insert(key, value)
        self._release(dropped)

    def get_or_create(self, key: K, create: Callable[[], V]) -> V:
        """The cached value, or a new one from `create()` (counted as a miss) that is then kept."""
        value = self.get(key)
        if value is not None:
            return value
        made = create()
        with self._lock:
            # Another thread may have created it meanwhile: keep theirs, so every caller shares one.
            if key in self._items:
                self._items.move_to_end(key)
                kept, dropped = self._items[key], [made]
            else:
                kept, dropped = made, self._insert(key, made)
        self._release(dropped)
        return kept

    def clear(self) -> None:
        with self._lock:
            dropped = list(self._items.values())
            self._items.clear()
        self._release(dropped)

    def _insert(self, key: K, value: V) -> list[V]:
        dropped = []
        if key in self._items and self._items[key] is not value:
            dropped.append(self._items[key])
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            dropped.append(self._items.popitem(last=False)[1])
            self.evictions += 1
        return dropped

    def _release(self, values: list[V]) -> None:
        # Outside the lock: closing an engine may synchronise the GPU.
        for value in values:
            self._on_evict(value)


@dataclass(frozen=True)
class PromptKey:
    profile: str
    prompt: str
    negative_prompt: str
    guidance: bool  # classifier-free guidance also needs the negative embedding


# (prompt embeddings, negative embeddings or None without guidance), each shaped [1, tokens, width].
Embeddings = tuple[torch.Tensor, torch.Tensor | None]


class PromptEmbeddingCache:
    """Text-encoder outputs by prompt, so a catalog that repeats a prompt encodes it once per worker.

    Tensors stay on the device that made them (~120 KB each for SD 1.x in fp16), ready to batch.
    """

    def __init__(self, capacity: int = 1024) -> None:
        # Tensors need no release: dropping the reference frees them.
        self._cache: LRUCache[PromptKey, Embeddings] = LRUCache(capacity, on_evict=lambda _: None)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, profile: str, prompt: str, negative_prompt: str, guidance: bool,
            encode: Callable[[], Embeddings]) -> Embeddings:
        return self._cache.get_or_create(PromptKey(profile, prompt, negative_prompt, guidance), encode)

    def clear(self) -> None:
        self._cache.clear()
