"""The whole stack in processes, for the e2e and fault tests: the API served by uvicorn, one CPU
worker and the control process (reconciler and beat), on the services and environment the
`settings` fixture set up, with time-scaled recovery settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from core.db import session_scope
from core.keys import create_key
from core.services import free_port
from core.settings import Settings
from step1x.client import Client
from workers.launcher import start_control, start_workers, stop_all

# Recovery on a test's time scale: what takes minutes in production takes seconds here.
# A worker is dead after 8 s of silence: on two busy cores a pool process loading a model can go
# quiet for seconds (production waits 30 s).
FAST = {"LEASE_SECONDS": "60", "RECONCILE_INTERVAL": "1", "REDISPATCH_AFTER": "3", "NEVER_SENT_AFTER": "5",
        "HEARTBEAT_INTERVAL": "0.5", "WORKER_DEAD_AFTER": "8", "OUTAGE_RETRY_BASE": "0.5",
        "OUTAGE_RETRY_MAX": "2", "PROGRESS_INTERVAL": "0.1"}


class Stack:
    def __init__(self, settings: Settings, folder: Path, **overrides: str) -> None:
        self.settings = settings
        self.logs = folder / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**{k: v for k, v in os.environ.items() if k.startswith("STEP1X_")},
                    **{f"STEP1X_{k}": v for k, v in {**FAST, **overrides}.items()}}
        self.port = free_port()
        self.api: subprocess.Popen[Any] | None = None
        self.worker: subprocess.Popen[Any] | None = None
        self.control: subprocess.Popen[Any] | None = None
        with session_scope(settings.database_url) as session:
            key = create_key(session, "stack")
        self.client = Client(f"http://127.0.0.1:{self.port}", key, timeout=30)

    def start(self) -> Stack:
        self.start_api()
        self.start_worker()
        self.control = start_control(self.logs, env=self.env)
        return self

    def start_api(self) -> None:
        self.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--port", str(self.port),
             "--log-level", "warning"], env={**os.environ, **self.env},
            stdout=(self.logs / "api.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.http.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.api.poll() is None, self.log("api")
            assert time.monotonic() < deadline, "API not ready"
            time.sleep(0.1)

    def start_worker(self) -> None:
        [self.worker] = start_workers([], self.logs, env=self.env)

    def kill_api(self) -> None:
        assert self.api is not None
        self.api.kill()
        self.api.wait()

    def kill_pool_child(self) -> None:
        """SIGKILL the prefork child running the micro-batch; the worker's main process lives on."""
        assert self.worker is not None
        children = psutil.Process(self.worker.pid).children(recursive=True)
        assert children, "prefork pool child not found"
        for child in children:
            os.kill(child.pid, signal.SIGKILL)

    def kill_worker(self) -> None:
        """SIGKILL the whole worker, main process and pool: a lost machine."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.logs / (f"{name}.log" if name == "api" else f"worker-{name}.log")
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self) -> None:
        self.client.close()
        stop_all([p for p in (self.api, self.worker, self.control) if p is not None], timeout=5)
