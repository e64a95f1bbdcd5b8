"""A bare Celery app with a no-op task: the baseline the orchestration is compared with. The same
worker options as the real workers (acks late, prefetch 1, concurrency 1, priority queue order);
the task only counts itself in Redis, so the benchmark knows when all have run."""

from __future__ import annotations

import os
from functools import lru_cache

import redis
from celery import Celery

QUEUE = "bench-noop"
DONE = "bench-noop-done"


@lru_cache(maxsize=2)
def app_for(broker_url: str) -> Celery:
    app = Celery("bench-noop", broker=broker_url, set_as_current=False)
    app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
                    worker_concurrency=1, task_ignore_result=True, worker_hijack_root_logger=False,
                    broker_transport_options={"queue_order_strategy": "priority"})
    counter = redis.Redis.from_url(broker_url)

    @app.task(name="bench.noop")
    def noop() -> None:
        counter.incr(DONE)

    return app


app = app_for(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
