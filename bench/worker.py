"""The worker's throughput on the whole system, each figure against its bare baseline in the same run.

- engine_bound_ratio: images/s of tiny-sd jobs through API, Redis, worker, S3 and PostgreSQL ÷ a raw
  loop calling the same engine on the same micro-batches in this process; ENGINE_ROUNDS rounds of
  the two, every other round in the mirror order.
- batching_gain: the same jobs planned into micro-batches ÷ micro-batches of one (forced by a
  calibration row, the planner's own input); raw_batching_gain: the same for the raw loop, which
  bounds it.
- worker_task_thread_cpu_vs_raw, worker_other_threads_cpu_vs_raw, other_processes_cpu_vs_raw: CPU
  seconds spent during the planned run by the worker pool process's task thread, by its other threads
  (storing, uploads, heartbeats) and by every other process, each ÷ the raw loop's seconds; the last
  split into s3_, postgres_, api_, redis_, bench_ and rest_cpu_vs_raw.
- system_engine_s_vs_raw, engine_share_of_wall, claim_share_of_wall: from the jobs' recorded stage
  timings, the seconds the worker's forward passes took ÷ the raw loop's, and the planned run's
  wall time spent in forward passes and in claims.
- upload_bound_ratio: near no-op jobs (lanczos on an 8x8 image) per second ÷ a bare loop of S3 PUTs
  of the same objects through the same client, one after another (`Storage.put`);
  upload_bound_ratio_vs_put_many: the same ÷ those PUTs sent as the worker sends a micro-batch's
  (`Storage.put_many`, STEP1X_UPLOAD_CONCURRENCY at once), the ceiling of storing alone.
- orchestration_vs_bare_celery: the same near no-op jobs/s ÷ a bare Celery no-op task loop (one
  message per task, same Redis, same worker options). Both near no-op figures: the median of ROUNDS
  rounds of system, Celery loop and PUT loops, run one after another (every other round in the
  mirror order), each round 1,000 jobs (2,000 in a full run): several micro-batches, whose stages
  overlap, not the latency of one.
- interactive_start_p95: seconds from submit to start (claim) of single jobs behind a bulk backlog,
  the same in micro-batch durations (forward passes), and against the allowance of one
  micro-batch + 100 ms (target <= 1); interactive_finish_p95: the same to their finish.
- worker_rss_growth_pct: worker RSS after many mixed jobs against after a tenth of them.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import redis
from PIL import Image
from sqlalchemy import delete, select

from bench.spread import mirrored
from bench.stack import PROCESS_GROUPS, BenchStack
from core import heap
from core.db import session_scope
from core.storage import Storage, output_key
from core.tables import Batch, Calibration, Job
from workers.launcher import QUIET

# cache off: every figure must run the engine, not copy an identical earlier output (same prompt and seed)
ROUNDS = 3  # of the near no-op figures within each repeat
ENGINE_ROUNDS = 2  # of the planned run and the raw loop within each repeat, in mirror order
GENERATE = {"kind": "generate", "prompt": "a product photo", "width": 64, "height": 64, "steps": 10, "cache": False}


def noise_png(size: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((size, size), 64 + seed).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def run_batch(client: httpx.Client, items: list[dict[str, Any]], timeout: float = 600) -> tuple[str, float]:
    """Submit and wait until the batch finished; (batch id, seconds from the request to the batch's
    `finished_at`). The end is the server's own stamp (one machine, one clock), so the poll can be
    slow: polling fast would load the API and the database the system under test shares the CPU with."""
    started = time.time()
    response = client.post("/v1/batches", json={"items": items})
    assert response.status_code == 202, response.text[:2000]
    batch_id = response.json()["id"]
    deadline = time.monotonic() + timeout
    while (batch := client.get(f"/v1/batches/{batch_id}").json())["finished_at"] is None:
        assert time.monotonic() < deadline, f"batch {batch_id} did not finish: {batch['counts']}"
        time.sleep(0.2)
    assert batch["counts"]["succeeded"] == len(items), batch["counts"]
    return batch_id, stamp_seconds(batch["finished_at"]) - started


def fresh_worker_rate(stack: BenchStack, env: dict[str, str], items: Callable[[int, int], list[dict[str, Any]]],
                      first: int, warm: int, count: int) -> float:
    """Jobs/s of one batch of `count` jobs on a worker freshly started with `env` (STEP1X_*), after a
    warm-up batch of `warm`; `items(start, n)` makes n distinct jobs numbered from `start`."""
    stack.start_worker(**env)
    try:
        with stack.client() as client:
            run_batch(client, items(first, warm))
            _, seconds = run_batch(client, items(first + warm, count))
        return count / seconds
    finally:
        stack.stop_worker()


def tagged_items(n: int, tag: str, **spec: Any) -> list[dict[str, Any]]:
    return [{"custom_id": f"{tag}-{i}", **spec, "seed": i} for i in range(n)]


def generate_requests(n: int) -> list[Any]:
    """The engine requests of `n` GENERATE jobs with seeds 0..n-1, as the worker builds them."""
    from models.engine import ImageRequest

    return [ImageRequest(kind="generate", prompt=str(GENERATE["prompt"]), width=64, height=64, steps=10, seed=i)
            for i in range(n)]


def engine_and_batching(stack: BenchStack, client: httpx.Client, n: int, few: int) -> dict[str, float]:
    """ENGINE_ROUNDS rounds of `n` images planned into micro-batches, through the system and through
    the raw loop, after both are warm, each round in the mirror order of the one before (system then
    raw loop, raw loop then system), so the machine's drift weighs on both sides alike; the ratio
    is of their total seconds. Then `few` images in micro-batches of one each way (gains are
    ratios of rates, so the slow single-image runs take fewer)."""
    from core.dispatch import Planned, cut, plan
    from core.specs import parse_item
    from models.profiles import create_engine

    run_batch(client, tagged_items(16, "warm", **GENERATE))  # the worker loads the model
    # The raw loop: the same engine, the same micro-batches, nothing else; its freed memory held
    # as in the worker's engine process.
    heap.hold_freed_memory()
    engine = create_engine("tiny-sd", stack.settings)
    spec = parse_item({**GENERATE, "model": "tiny-sd", "seed": 0})
    key, cost = plan(spec, stack.settings)
    batches = cut([Planned(str(i), key, cost, "bulk") for i in range(n)], stack.settings)
    requests = generate_requests(n)
    # Warm like the worker, which has run the warm-up batch: every micro-batch size, twice (a trace
    # is made at its first size, checked once at each other, and optimised on its second run).
    for size in sorted({len(batch) for batch in batches} | {1}):
        for _ in range(2):
            engine.run(requests[:size])

    planned_s = raw_s = engine_s = claim_s = 0.0
    raw_faults = engine_faults = 0
    cpu: dict[str, float] = {}

    def system(round_: int) -> None:
        nonlocal planned_s, engine_s, claim_s, engine_faults
        cpu_before, faults_before = stack.cpu_seconds(), stack.engine_page_faults()
        planned_id, seconds = run_batch(client, tagged_items(n, f"planned{round_}", **GENERATE))
        planned_s += seconds
        for name, spent in stack.cpu_seconds().items():
            cpu[name] = cpu.get(name, 0.0) + spent - cpu_before[name]
        engine_faults += stack.engine_page_faults() - faults_before
        with session_scope(stack.settings.database_url) as session:
            timings = list(session.scalars(select(Job.timings).where(Job.batch_id == planned_id)))
        # The jobs' own stage shares add up to the seconds their micro-batches spent in each stage.
        engine_s += sum((t or {}).get("run", 0.0) for t in timings)
        claim_s += sum((t or {}).get("claim", 0.0) for t in timings)

    def raw(_: int) -> None:
        nonlocal raw_s, raw_faults
        started, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        done = 0
        for batch in batches:
            engine.run(requests[done:done + len(batch)])
            done += len(batch)
        raw_s += time.perf_counter() - started
        raw_faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for round_ in range(ENGINE_ROUNDS):
        for side in mirrored((system, raw), round_):
            side(round_)
    with session_scope(stack.settings.database_url) as session:
        session.add(Calibration(profile="tiny-sd", device="bench", batch_size=1, pixel_budget=64 * 64,
                                images_per_s=0.0, trials=[], worker="bench"))
    _, single_s = run_batch(client, tagged_items(few, "single", **GENERATE))
    with session_scope(stack.settings.database_url) as session:
        session.execute(delete(Calibration))
    started = time.perf_counter()
    for request in requests[:few]:  # the engine's own gain from batching bounds the system's
        engine.run([request])
    raw_single_s = time.perf_counter() - started
    images = n * ENGINE_ROUNDS
    return {"engine_bound_ratio": raw_s / planned_s,
            "batching_gain": (images / planned_s) / (few / single_s),
            "raw_batching_gain": (images / raw_s) / (few / raw_single_s),
            "system_images_per_s": images / planned_s, "raw_engine_images_per_s": images / raw_s,
            # Where the system's CPU went, in seconds per second of the raw loop: a task thread well
            # above 1 spent more CPU than the raw loop on the same forward passes (its claims and
            # hand-overs are a few hundredths).
            "worker_task_thread_cpu_vs_raw": cpu["task_thread"] / raw_s,
            "worker_other_threads_cpu_vs_raw": cpu["other_threads"] / raw_s,
            "engine_process_cpu_vs_raw": cpu["engine_process"] / raw_s,
            # Memory faulted in per image, each page zeroed: near 0 with freed memory held
            # (`core.heap.hold_freed_memory`, `python -m bench.malloc`).
            "engine_page_faults_per_image": engine_faults / images, "raw_page_faults_per_image": raw_faults / images,
            "other_processes_cpu_vs_raw": cpu["other_processes"] / raw_s,
            # ... split: the storage service, the database, the API, Redis, this bench, the rest.
            **{f"{group}_cpu_vs_raw": cpu[group] / raw_s for group in PROCESS_GROUPS},
            # Where the planned runs' wall time went: the engine's forward passes (and how much
            # slower than the raw loop's), the claims, and the rest (Celery's hand-over between
            # messages, submission, the last micro-batch's store).
            "system_engine_s_vs_raw": engine_s / raw_s,
            "engine_share_of_wall": engine_s / planned_s,
            "claim_share_of_wall": claim_s / planned_s}


def uploads_and_orchestration(stack: BenchStack, client: httpx.Client, n: int) -> dict[str, float]:
    """ROUNDS rounds of the system, the bare Celery loop and the bare PUT loops, one after another; each
    ratio is the median of its rounds' ratios. One round of 1,000 jobs lasts under a second, in
    which one slow moment of the shared machine (or a pause of the collector) moves a figure by a
    tenth; the rounds' neighbours share what the machine was doing."""
    image = client.post("/v1/files", files={"file": ("x.png", noise_png(8))}).json()["id"]
    spec = {"kind": "upscale", "image": image, "model": "lanczos-x4", "cache": False}
    run_batch(client, tagged_items(16, "warm-up", **spec))
    storage = Storage(stack.settings)
    data = noise_png(32)
    run_id = uuid.uuid4().hex[:8]  # the repeats share one stack: each PUT a new object
    with bare_celery(stack) as celery_loop:
        def jobs(round_: int) -> float:
            return run_batch(client, tagged_items(n, f"noop{round_}", **spec))[1]

        def put(round_: int) -> float:
            started = time.perf_counter()
            for i in range(n):
                storage.put(output_key("bench", "bare", f"{run_id}-{round_}-{i}"), data, "image/png")
            return time.perf_counter() - started

        def put_many(round_: int) -> float:
            started = time.perf_counter()
            storage.put_many((output_key("bench", "many", f"{run_id}-{round_}-{i}"), data, "image/png")
                             for i in range(n))
            return time.perf_counter() - started

        # The system next to the Celery loop, then the PUT loops; every other round in the mirror order.
        sides = {"system": jobs, "celery": lambda _: celery_loop(n), "put": put, "put_many": put_many}
        rounds: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(ROUNDS):
            for name in mirrored(list(sides), round_):
                rounds[name].append(sides[name](round_))
    system = rounds["system"]
    median = statistics.median
    return {"upload_bound_ratio": median(put / s for put, s in zip(rounds["put"], system, strict=True)),
            "orchestration_vs_bare_celery": median(c / s for c, s in zip(rounds["celery"], system, strict=True)),
            # The worker's own way of storing, no job around it: informative, no target.
            "upload_bound_ratio_vs_put_many": median(p / s for p, s in zip(rounds["put_many"], system, strict=True)),
            "noop_jobs_per_s": median(n / s for s in system), "bare_put_per_s": median(n / s for s in rounds["put"]),
            "bare_put_many_per_s": median(n / s for s in rounds["put_many"]),
            "bare_celery_tasks_per_s": median(n / s for s in rounds["celery"])}


@contextlib.contextmanager
def bare_celery(stack: BenchStack) -> Iterator[Callable[[int], float]]:
    """A Celery worker (same options as ours) for no-op tasks; yields a function that sends n of them,
    one message each, and returns the seconds until all have run."""
    from bench.noop import DONE, QUEUE, app_for

    broker = redis.Redis.from_url(stack.settings.redis_url)
    broker.delete(DONE)
    app = app_for(stack.settings.redis_url)

    def done_reaches(count: int, pause: float) -> None:
        deadline = time.monotonic() + 120
        while int(broker.get(DONE) or 0) < count:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bare Celery worker ran {int(broker.get(DONE) or 0)} of {count} tasks "
                                   f"(exit code {worker.returncode})")
            time.sleep(pause)

    def run(n: int) -> float:
        before = int(broker.get(DONE) or 0)
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                app.send_task("bench.noop", queue=QUEUE, producer=producer)
        done_reaches(before + n, 0.005)
        return time.perf_counter() - started

    env = {**os.environ, "BENCH_BROKER_URL": stack.settings.redis_url}
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.noop", "worker", "-Q", QUEUE,
                               "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "WARNING", *QUIET],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        app.send_task("bench.noop", queue=QUEUE)  # wait for the worker to be up
        done_reaches(1, 0.05)
        yield run
    finally:
        worker.terminate()
        worker.wait()


def singles_waits(client: httpx.Client, spec: dict[str, Any], backlog: int,
                  probes: int) -> tuple[str, dict[str, list[float]]]:
    """Send a batch of `backlog` jobs of `spec`, then single jobs of it one after another, each
    waited for; (the batch's id, each single job's seconds from submit to started_at (claimed) and
    to finished_at). Cancels the batch."""
    response = client.post("/v1/batches", json={"items": tagged_items(backlog, "backlog", **spec)})
    assert response.status_code == 202, response.text[:2000]
    bulk_id = response.json()["id"]
    waits: dict[str, list[float]] = {"started_at": [], "finished_at": []}
    for i in range(probes):
        job = client.post("/v1/jobs", json={**spec, "seed": 10**6 + i}).json()
        while (state := client.get(f"/v1/jobs/{job['id']}").json())["status"] in ("queued", "running"):
            time.sleep(0.01)
        assert state["status"] == "succeeded", state
        for stage, stage_waits in waits.items():
            stage_waits.append(stamp_seconds(state["timings"][stage]) - stamp_seconds(state["timings"]["queued_at"]))
    client.post(f"/v1/batches/{bulk_id}/cancel")
    return bulk_id, waits


def p95(values: list[float]) -> float:
    # Inclusive: from a handful of probes (5 in a quick run) the default method extrapolates a p95
    # beyond the slowest probe; this one interpolates between the measured waits.
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) >= 2 else values[0]


def interactive_start(stack: BenchStack, client: httpx.Client, backlog: int, probes: int) -> dict[str, float]:
    bulk_id, waits = singles_waits(client, GENERATE, backlog, probes)
    # A micro-batch's duration is its forward pass: the run seconds of its jobs (claimed together,
    # so sharing a started_at). Not started_at to finished_at, which with the engine process also
    # holds the wait behind the micro-batch before it.
    with session_scope(stack.settings.database_url) as session:
        passes: dict[Any, float] = {}
        for start, timings in session.execute(select(Job.started_at, Job.timings).where(
                Job.batch_id == bulk_id, Job.status == "succeeded")):
            passes[start] = passes.get(start, 0.0) + (timings or {}).get("run", 0.0)
    micro_batch_s = statistics.median(passes.values()) if passes else float("nan")
    start, finish = p95(waits["started_at"]), p95(waits["finished_at"])
    # The target: a single job starts within one micro-batch (the one in the engine) plus 100 ms.
    # Started is when it was claimed; with the engine process its forward pass may wait behind
    # the micro-batch queued there too, which the time to its finish shows.
    return {"interactive_start_p95_s": start, "interactive_start_p95_micro_batches": start / micro_batch_s,
            "interactive_start_p95_vs_allowance": start / (micro_batch_s + 0.1),
            "interactive_finish_p95_s": finish, "interactive_finish_p95_micro_batches": finish / micro_batch_s}


def stamp_seconds(stamp: str) -> float:
    from datetime import UTC, datetime

    return datetime.fromisoformat(stamp.removesuffix("Z")).replace(tzinfo=UTC).timestamp()


def worker_rss(stack: BenchStack, client: httpx.Client, n: int) -> dict[str, float]:
    image = client.post("/v1/files", files={"file": ("y.png", noise_png(8, 1))}).json()["id"]
    items = [{"custom_id": f"mix-{i}", **GENERATE, "seed": i} if i % 10 == 0 else
             {"custom_id": f"mix-{i}", "kind": "upscale", "image": image, "model": "lanczos-x4", "seed": i}
             for i in range(n)]
    early = n // 10
    batch_id = client.post("/v1/batches", json={"items": items}).json()["id"]
    rss_early = None
    while True:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if rss_early is None and batch["counts"]["succeeded"] >= early:
            rss_early = stack.worker_rss()
        if batch["finished_at"] is not None:
            break
        time.sleep(0.05)
    assert rss_early is not None
    return {"worker_rss_growth_pct": (stack.worker_rss() - rss_early) / rss_early * 100}


def run(stack: BenchStack, quick: bool) -> dict[str, float]:
    stack.fresh_database()
    stack.start_worker()
    try:
        with stack.client() as client:
            # A run's start (submission, the first claim) and end (the last micro-batch's store) are
            # fixed costs, 3% of the wall time of a run of 256 images: a catalog run is thousands.
            figures = engine_and_batching(stack, client, 320 if quick else 1024, 64 if quick else 128)
            # Jobs/s of a stream of micro-batches (at most 256 jobs each), not the latency of one:
            # 1,000 near no-op jobs are four, whose stages overlap as a catalog's do.
            figures |= uploads_and_orchestration(stack, client, 1000 if quick else 2000)
            figures |= interactive_start(stack, client, 10_000, 5 if quick else 20)
            figures |= worker_rss(stack, client, 600 if quick else 5000)
    finally:
        stack.stop_worker()
    with session_scope(stack.settings.database_url) as session:
        assert session.scalar(select(Batch.id).where(Batch.finished_at.is_(None))) is None
    return figures
