"""Reads the inputs of the micro-batch a worker will most likely run next while its engine runs
this one, so that micro-batch starts on decoded images instead of waiting on S3.

A worker holds one message at a time (prefetch 1), so that an interactive job never waits behind
bulk work already taken: its next micro-batch is not known for sure. The lookahead peeks at the
message Redis would hand this worker next without taking it: the first non-empty queue in the
order the worker reads them (kombu's "priority" order), at the end BRPOP takes from. It looks up
which input files that message's queued jobs read and starts reading and decoding them in the
background. When the next micro-batch reads an input, it adopts the read already made (waiting
for it if it is still under way) instead of making its own.

Wrong guesses cost only the reads: another worker may take that message first, or an interactive
message may arrive before it. Inputs are never modified once uploaded (a new upload is a new file
id), so an image read ahead is the one the job would have read.

Memory: one micro-batch ahead. Each peek keeps only the reads the newly peeked message needs, so
the lookahead holds at most the inputs of one micro-batch, whose size the planner bounds.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import json
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import redis
from PIL import Image
from sqlalchemy import select

from core.db import session_scope
from core.settings import Settings
from core.specs import FILE_FIELDS
from core.status import JobStatus
from core.storage import Storage, input_key
from core.tables import Job

log = logging.getLogger(__name__)


def prefetching(settings: Settings) -> bool:
    """STEP1X_PREFETCH_INPUTS, or by default: on unless S3 is on this machine's loopback. The
    lookahead hides reads that wait on the network; reads from S3 on the same machine wait on its
    CPU, which the forward pass needs too (`python -m bench.prefetch`, README)."""
    if settings.prefetch_inputs is not None:
        return settings.prefetch_inputs
    host = urlsplit(settings.s3_endpoint_url or "https://s3.amazonaws.com").hostname or ""
    with contextlib.suppress(ValueError):
        return not ipaddress.ip_address(host).is_loopback
    return host != "localhost"


def input_keys(tenant: str, spec: Mapping[str, Any]) -> set[str]:
    """The storage keys of the input files a stored job spec reads."""
    return {input_key(tenant, file_id) for name in FILE_FIELDS if isinstance(file_id := spec.get(name), str)}


def read_input(storage: Storage, key: str) -> Image.Image:
    """An input image, read and decoded (kept only once decoded: bad bytes fail every job that reads it)."""
    image = Image.open(io.BytesIO(storage.get(key)))
    image.load()
    return image


def job_ids_of(message: bytes) -> list[str]:
    """The job ids a run_batch message carries, from kombu's Redis envelope (JSON, with the body
    base64-encoded; Celery's message protocol 2 body is [args, kwargs, embed], args = [job ids])."""
    envelope = json.loads(message)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    return [str(job_id) for job_id in args[0]]


class Lookahead:
    def __init__(self, settings: Settings, storage: Storage, queues: Sequence[str]) -> None:
        self.settings, self.storage, self.queues = settings, storage, list(queues)
        # Bounded: a peek that hangs on a half-open connection would stall every later one.
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        # The peek, then the reads: one thread peeks, the rest read in parallel (as the micro-batch's
        # own reads do), on threads of their own, so they never queue behind its reads or uploads.
        self._pool = ThreadPoolExecutor(max_workers=settings.upload_concurrency + 1, thread_name_prefix="lookahead")
        self._reads: dict[str, Future[Image.Image]] = {}
        self._lock = threading.Lock()

    def ahead(self, current: Iterable[str]) -> None:
        """Start reading the inputs of the next message's jobs, except those of the micro-batch in
        hand (`current`); returns at once."""
        self._pool.submit(self._ahead, set(current))

    def adopt(self, key: str) -> Image.Image | None:
        """The input read ahead under this key, waiting for the read if it is still under way; None
        if it was not read ahead or its read failed (the caller reads it again and reports the error)."""
        with self._lock:
            read = self._reads.pop(key, None)
        if read is None or read.cancel():  # not started yet: the caller's own reads are as quick
            return None
        try:
            return read.result()
        except Exception:
            return None

    def holds(self, key: str) -> bool:
        """Whether this input has been read ahead (or its read failed) and waits to be adopted."""
        with self._lock:
            read = self._reads.get(key)
        return read is not None and read.done()

    def peek(self) -> tuple[str, list[str]] | None:
        """The queue and job ids of the message this worker would take next; None if every queue is empty."""
        pipe = self._redis.pipeline(transaction=False)
        for queue in self.queues:
            pipe.lindex(queue, -1)  # kombu LPUSHes and BRPOPs: the next message is the last one
        for queue, message in zip(self.queues, pipe.execute(), strict=True):
            if message is not None:
                return queue, job_ids_of(message)
        return None

    def _reads_inputs(self, queue: str) -> bool:
        """Whether jobs on this queue may read input files: not those of a text-to-image model
        (skipping the database lookup keeps generation's micro-batches free of it)."""
        profile = self.settings.models.get(queue.partition(".")[2])
        return profile is None or profile.task != "generate"

    def _ahead(self, current: set[str]) -> None:
        try:
            peeked = self.peek()
            ids = [job_id for job_id in peeked[1] if job_id not in current] if peeked else []
            wanted = self._inputs_of(ids) if ids and peeked and self._reads_inputs(peeked[0]) else set()
        except Exception as exc:  # a guess that could not be made costs nothing but the reads
            log.debug("lookahead: %s", exc)
            return
        with self._lock:
            reads = {key: read for key, read in self._reads.items() if key in wanted}
            for key, read in self._reads.items():
                if key not in wanted:  # one micro-batch ahead: a read under way finishes and is forgotten
                    read.cancel()
            for key in wanted - reads.keys():
                reads[key] = self._pool.submit(read_input, self.storage, key)
            self._reads = reads

    def _inputs_of(self, job_ids: list[str]) -> set[str]:
        with session_scope(self.settings.database_url) as session:
            rows = session.execute(select(Job.tenant_id, Job.spec).where(
                Job.id.in_(job_ids), Job.status == JobStatus.QUEUED))
            return {key for tenant, spec in rows for key in input_keys(tenant, spec)}
