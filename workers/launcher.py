"""One Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES and named after its GPU.

Each worker runs one micro-batch at a time (concurrency 1, prefetch 1): a GPU does one forward pass
at a time anyway, and a second message waiting in a busy worker would only delay another GPU.
Without a GPU, one CPU worker. Beside them, optionally, the control process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.dispatch import CONTROL, worker_queues
from core.services import die_with_parent
from core.settings import get_settings

# Celery's worker-to-worker chatter, which nothing here reads: workers report to the database (the
# workers table), not to Celery events. Mingle alone waits a second at every start for neighbours
# to answer (measured, `python -m bench.startup`: worker ready 3.3 -> 2.3 s, control 1.9 -> 0.9 s);
# gossip and heartbeat keep a Redis pub/sub connection each that must be torn down and rebuilt on
# every broker reconnect. Remote control (draining a worker) is separate and stays on.
QUIET = ["--without-gossip", "--without-mingle", "--without-heartbeat"]


def detect_gpus() -> list[str]:
    """GPU indices from nvidia-smi (no torch import: the launcher stays light)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def parse_gpus(spec: str, available: Sequence[str]) -> list[str]:
    """'all' -> every GPU found (none: CPU); 'cpu' -> none; '0,1' -> those, which must exist."""
    if spec == "all":
        return list(available)
    if spec in ("", "cpu", "none"):
        return []
    wanted = [part.strip() for part in spec.split(",") if part.strip()]
    missing = [g for g in wanted if g not in available]
    if missing:
        found = ", ".join(available) or "none"
        raise ValueError(f"--gpus {spec}: GPU {', '.join(missing)} not found (found: {found})")
    return wanted


def parse_models(spec: str | None, configured: Sequence[str]) -> list[str]:
    """'--models a,b' -> those profiles, which must be configured; none given -> every configured
    profile (a worker that cannot load one fails its jobs with a message saying which weights are
    missing, instead of leaving them queued where no worker looks)."""
    if not spec or spec == "all":
        return sorted(configured)
    wanted = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [m for m in wanted if m not in configured]
    if unknown:
        raise ValueError(f"--models {spec}: unknown profile {', '.join(unknown)} "
                         f"(configured: {', '.join(sorted(configured))})")
    return wanted


def worker_commands(gpus: Sequence[str], loglevel: str = "INFO", control: bool = False,
                    models: Sequence[str] | None = None) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, extra env) per process: one inference worker per GPU (or one CPU worker), then,
    with `control`, the control process (reconciler and beat). Run exactly one control process per
    deployment: each runs a beat. Each inference worker consumes the queues of the `models` it
    serves (default: every configured profile), so micro-batches reach only workers that keep
    their model warm."""
    host = socket.gethostname()
    served = parse_models(None, list(get_settings().models)) if models is None else models
    base = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--concurrency", "1",
            "--prefetch-multiplier", "1", "-Q", ",".join(worker_queues(served)), "--loglevel", loglevel, *QUIET]
    if not gpus:
        # An empty value hides every GPU, so the CPU worker never grabs one by accident.
        commands = [(f"cpu@{host}", [*base, "-n", f"cpu@{host}"], {"CUDA_VISIBLE_DEVICES": ""})]
    else:
        commands = [(f"gpu{g}@{host}", [*base, "-n", f"gpu{g}@{host}"], {"CUDA_VISIBLE_DEVICES": g})
                    for g in gpus]
    if control:
        commands.append(control_command(loglevel))
    return commands


def control_command(loglevel: str = "INFO") -> tuple[str, list[str], dict[str, str]]:
    """The light control process: a thread-pool Celery worker on the control queue, with the beat.
    It imports no torch, so recovery never waits behind (or for) inference."""
    name = f"control@{socket.gethostname()}"
    argv = [sys.executable, "-m", "celery", "-A", "workers.control", "worker", "-n", name, "-Q", CONTROL,
            "--pool", "threads", "--concurrency", "16", "--loglevel", loglevel, "--beat", *QUIET]
    return name, argv, {"CUDA_VISIBLE_DEVICES": ""}


def start_workers(gpus: Sequence[str], log_dir: Path | None = None, loglevel: str = "INFO",
                  env: dict[str, str] | None = None, control: bool = False, models: Sequence[str] | None = None
                  ) -> list[subprocess.Popen[Any]]:
    return [spawn(name, argv, {**(env or {}), **extra}, log_dir)
            for name, argv, extra in worker_commands(gpus, loglevel, control, models)]


def start_control(log_dir: Path | None = None, loglevel: str = "INFO", env: dict[str, str] | None = None
                  ) -> subprocess.Popen[Any]:
    name, argv, extra = control_command(loglevel)
    return spawn(name, argv, {**(env or {}), **extra}, log_dir)


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path | None) -> subprocess.Popen[Any]:
    with contextlib.ExitStack() as files:
        out: Any = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            out = files.enter_context((log_dir / f"worker-{name.split('@')[0]}.log").open("ab"))
        # Own process group, so stopping can reach Celery's pool children too; SIGTERM (warm
        # shutdown) if the launcher itself dies. The child keeps its own copy of the log file.
        return subprocess.Popen(argv, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT if out else None, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM))


def stop_all(procs: Sequence[subprocess.Popen[Any]], timeout: float = 20) -> None:
    """Warm shutdown first (Celery finishes the micro-batch in hand), then force the whole process
    group: a micro-batch cut short is redelivered and re-run, since its message was never acked."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def calibrate(gpus: Sequence[str], models: Sequence[str], loglevel: str = "INFO") -> None:
    """Measure each device's best micro-batch per model before its worker starts (one at a time:
    the measurements must not share the machine)."""
    for name, _, extra in worker_commands(gpus, loglevel, models=models):
        subprocess.run([sys.executable, "-m", "workers.calibrate", "--models", ",".join(models), "--worker", name],
                       env={**os.environ, **extra}, check=True)


def run(gpus_spec: str, loglevel: str = "INFO", beat: bool = False, models_spec: str | None = None,
        calibrate_first: bool = False) -> int:
    """Start the workers and supervise them until a signal or until one exits. `beat` also starts
    the control process (the reconciler and its beat): do it on one machine of a deployment."""
    gpus = parse_gpus(gpus_spec, detect_gpus())
    models = parse_models(models_spec, list(get_settings().models))
    if calibrate_first:
        calibrate(gpus, models, loglevel)
    procs = start_workers(gpus, loglevel=loglevel, control=beat, models=models)
    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        stop_all(procs)
    # A worker that died (killed, crashed) must not be hidden by the others' clean exits.
    return next((p.returncode for p in procs if p.returncode), 0)
