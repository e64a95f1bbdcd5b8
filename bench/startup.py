"""`python -m bench.startup`: seconds from spawning a worker or the control process (the command
lines `workers.launcher` builds) to Celery's "ready" line, with and without the `QUIET` options,
interleaved and repeated. Needs only Redis, which it starts."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from core.services import start_redis
from workers.launcher import QUIET, control_command, worker_commands

REPEATS = 3


def seconds_to_ready(argv: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "ready." in line:
                return time.monotonic() - started
        raise RuntimeError(f"{' '.join(argv[:6])}... exited before it was ready")
    finally:
        process.terminate()
        process.wait(30)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, start_redis(Path(tmp)) as redis:
        env = {**os.environ, "STEP1X_REDIS_URL": redis.url, "STEP1X_DATA_DIR": tmp,
               "STEP1X_DATABASE_URL": f"sqlite:///{tmp}/step1x.db"}
        (_, worker, worker_env), control = worker_commands([], "INFO")[0], control_command("INFO")
        times: dict[str, list[float]] = {}
        for _ in range(REPEATS):
            for name, argv, extra in (("worker", worker, worker_env), ("control", control[1], control[2])):
                chatty = [arg for arg in argv if arg not in QUIET]
                for variant, command in (("default", chatty), ("quiet", argv)):
                    times.setdefault(f"{name} {variant}", []).append(seconds_to_ready(command, {**env, **extra}))
    for label, values in times.items():
        print(f"{label:16s} ready after {statistics.median(values):.2f} s (median of {REPEATS}: "
              f"{', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
