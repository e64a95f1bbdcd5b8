"""A module's calls run as TorchScript traces, so its graph runs in C++ without the interpreter lock.

For small diffusion models on a CPU (a profile's `trace` field): their forward pass is Python
dispatching thousands of small operations, each taking the interpreter lock back, so it pays for
the dispatch and waits whenever another thread of the worker holds the lock. Traced, the tiny SD
draws 1.28-1.35x the images/s, and keeps 0.92-0.99 of them (eager: 0.81-0.86) beside a thread
holding the lock 15% of the time; SD 1.5's UNet, whose operations are large, gains 1.00-1.05x
(`python -m bench.tracing`, four runs). The pixels are the same (`tests/models/test_tracing.py`).

A trace records one path through the module's Python, so each signature gets its own: the shapes
(but the batch size), dtypes and devices of the tensor arguments and the values of the others (a
flag, a scale). Calls with other arguments (an object), and calls not asking for
`return_dict=False` (a trace returns tensors and tuples, not diffusers' output classes), run the
module as it is. A module makes at most SIGNATURES traces over its life, then runs new signatures
eagerly: each trace holds a copy of the module's graph that TorchScript never gives back, even once
the trace is dropped (the weights are shared).

TorchScript is deprecated in PyTorch 2.x in favour of torch.compile and torch.export. Should
`torch.jit.trace` fail or go away, the module runs eagerly and the worker says so once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# Traces made per module over its life. TorchScript keeps a trace's graph after the trace is dropped
# (18 MB each for the tiny UNet, `python -m bench.tracing`), so evicting old traces would not bound memory: past this,
# new signatures run eagerly.
SIGNATURES = 8


class _Untraceable(Exception):
    """An argument a trace cannot take as an input or bake in as a constant."""


def _signature(value: Any, tensors: list[torch.Tensor]) -> Hashable:
    """A hashable description of `value`, batch sizes left out, with its tensors collected into
    `tensors` in order."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return "tensor", (tuple(value.shape[1:]), value.dim(), value.dtype, value.device)
    if value is None or isinstance(value, bool | int | float | str):
        # The type too: True, 1 and 1.0 hash alike and can take different paths.
        return type(value).__name__, value
    if isinstance(value, list | tuple):
        return type(value).__name__, tuple(_signature(v, tensors) for v in value)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return "dict", tuple((k, _signature(v, tensors)) for k, v in value.items())
    raise _Untraceable(type(value).__name__)


def _rebuild(signature: Any, tensors: Iterator[torch.Tensor]) -> Any:
    kind, body = signature
    if kind == "tensor":
        return next(tensors)
    if kind in ("list", "tuple"):
        items = [_rebuild(s, tensors) for s in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _rebuild(s, tensors) for k, s in body}
    return body


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    return []


def _same(traced: Any, eager: Any) -> bool:
    a, b = _leaves(traced), _leaves(eager)
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x, y, rtol=1e-3, atol=1e-4)
                                    for x, y in zip(a, b, strict=True))


class _Call(torch.nn.Module):
    """The module's call with its arguments rebuilt from flat tensors: what torch.jit.trace records.
    Holding the module as a child makes its weights the trace's parameters (shared, not copied)."""

    def __init__(self, module: torch.nn.Module, method: Callable[..., Any], signature: Hashable) -> None:
        super().__init__()
        self.module = module
        self.method = method
        self.signature = signature

    def forward(self, *tensors: torch.Tensor) -> Any:
        args, kwargs = _rebuild(self.signature, iter(tensors))
        return self.method(*args, **kwargs)


@dataclass
class _Entry:
    trace: Callable[..., Any]
    shapes: set[tuple[torch.Size, ...]]  # the exact tensor shapes it was traced or checked at


class Traced:
    """Stands in for `module.<name>`: the same call, run through a trace of its signature.

    One trace serves every batch size: shapes flow through a trace as values, and diffusers' UNet,
    ControlNet and VAE decoder take no Python branch on the batch size. Each new batch size is still
    checked once against the module itself; should the trace have baked one in, that signature gets
    a trace per batch size from then on."""

    def __init__(self, module: torch.nn.Module, name: str = "forward", ignore: tuple[str, ...] = (),
                 capacity: int = SIGNATURES) -> None:
        self.module = module
        self.name = name
        self.eager: Callable[..., Any] = getattr(module, name)
        self.ignore = ignore
        self.capacity = capacity
        self.traces: dict[Hashable, _Entry] = {}
        self.made = 0
        self.per_batch: set[Hashable] = set()  # signatures whose traces did not generalise
        self.broken = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken or kwargs.get("return_dict", True):
            # Traces return tensors and tuples, not the output dataclasses.
            return self.eager(*args, **kwargs)
        tensors: list[torch.Tensor] = []
        kept = {k: v for k, v in kwargs.items() if k not in self.ignore}
        try:
            signature = _signature((args, kept), tensors)
        except _Untraceable:
            return self.eager(*args, **kwargs)
        shapes = tuple(t.shape for t in tensors)
        family = signature, torch.is_grad_enabled()
        key = (family, shapes) if family in self.per_batch else family
        entry = self.traces.get(key)
        if entry is None:
            trace = self._trace(signature, tensors) if self.made < self.capacity else None
            if trace is None:
                return self.eager(*args, **kwargs)
            self.made += 1
            self.traces[key] = _Entry(trace, {shapes})
            return trace(*tensors)
        if shapes in entry.shapes:
            return entry.trace(*tensors)
        want = self.eager(*args, **kwargs)
        try:
            agrees = _same(entry.trace(*tensors), want)
        except torch.cuda.OutOfMemoryError:  # the caller's to handle (calibration stops there)
            raise
        except RuntimeError:  # a size baked into a view or a reshape
            agrees = False
        if agrees:
            entry.shapes.add(shapes)
        else:
            log.info("%s.%s: a trace did not carry over to batch shapes %s; tracing per batch size",
                     type(self.module).__name__, self.name, [tuple(s) for s in shapes])
            # It keeps serving the shapes it was made or checked at, each as a signature of its own.
            self.per_batch.add(family)
            del self.traces[key]
            self.traces.update({(family, checked): _Entry(entry.trace, {checked}) for checked in entry.shapes})
        return want

    def _trace(self, signature: Hashable, tensors: list[torch.Tensor]) -> Callable[..., Any] | None:
        call = _Call(self.module, self.eager, signature)
        try:
            with warnings.catch_warnings():
                # TracerWarnings flag Python branches on shapes, which the signature pins (the batch
                # size: the check at each new one); the deprecation is TorchScript's (module docstring).
                warnings.simplefilter("ignore")
                return torch.jit.trace(call, tuple(tensors), check_trace=False, strict=False)
        except Exception as error:  # whatever tracing cannot take, the module still runs eagerly
            self.broken = True
            log.warning("%s.%s runs eagerly: tracing it failed (%s: %s)", type(self.module).__name__,
                        self.name, type(error).__name__, error)
            return None


def trace_calls(module: torch.nn.Module, name: str = "forward", ignore: tuple[str, ...] = ()) -> Traced:
    """Route `module.<name>(...)` through traces from now on, leaving out the keyword arguments in
    `ignore` (ones the method takes and never uses); returns the stand-in."""
    traced = Traced(module, name, ignore)
    setattr(module, name, traced)
    return traced
