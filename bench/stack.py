"""The whole system for benchmarks: PostgreSQL, Redis, SeaweedFS, the API (uvicorn) and workers as
separate processes, as in production, on free loopback ports in a scratch folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.db import session_scope, upgrade
from core.keys import create_key
from core.services import die_with_parent, free_port, start_postgres, start_redis, start_seaweedfs
from core.settings import Settings
from core.storage import Storage
from workers import launcher

ACCESS_KEY, SECRET_KEY = "step1x-bench", "step1x-bench-secret"
# What `BenchStack.cpu_seconds` splits the machine's other processes into.
PROCESS_GROUPS = ("s3", "postgres", "api", "redis", "bench", "rest")


class BenchStack:
    def __init__(self, workdir: Path, models_dir: Path, profiles: dict[str, dict[str, Any]] | None = None) -> None:
        """`profiles`: model profiles (STEP1X_MODELS) for the API, the workers and `settings`."""
        self.workdir, self.models_dir = workdir, models_dir
        self.profiles = profiles or {}
        self._exit = ExitStack()
        self.workers: list[subprocess.Popen[Any]] = []
        self.api: subprocess.Popen[Any] | None = None
        self.env: dict[str, str] = {}
        self._databases = 0

    def __enter__(self) -> BenchStack:
        try:
            self.postgres = self._exit.enter_context(start_postgres(self.workdir / "services"))
            self.redis = self._exit.enter_context(start_redis(self.workdir / "services"))
            self.s3 = self._exit.enter_context(start_seaweedfs(self.workdir / "services", ACCESS_KEY, SECRET_KEY))
            self.fresh_database()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_worker()
        self.stop_api()
        self._exit.close()

    def fresh_database(self) -> None:
        """A new database, bucket and Redis db, and an API started on them: runs do not share state.
        The last run's database is dropped: left, PostgreSQL's autovacuum went through a submission
        family's 100,000 rows during the next worker family's near no-op rounds (seen on the third
        repeat's, 0.69 of the bare Celery loop against 1.08 on the first)."""
        self.stop_worker()
        self.stop_api()
        admin = create_engine(self.postgres.url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            if self._databases:
                conn.execute(text(f"DROP DATABASE bench_{self._databases} WITH (FORCE)"))
            self._databases += 1
            name = f"bench_{self._databases}"
            conn.execute(text(f"CREATE DATABASE {name}"))
        admin.dispose()
        redis.Redis.from_url(self.redis.url).flushdb()
        self.env = {
            "STEP1X_DATABASE_URL": make_url(self.postgres.url).set(database=name).render_as_string(False),
            "STEP1X_REDIS_URL": self.redis.url, "STEP1X_S3_ENDPOINT_URL": self.s3.url,
            "STEP1X_S3_ACCESS_KEY": ACCESS_KEY, "STEP1X_S3_SECRET_KEY": SECRET_KEY,
            "STEP1X_S3_BUCKET": name.replace("_", "-"), "STEP1X_DATA_DIR": str(self.workdir / "data"),
            "STEP1X_MODELS_DIR": str(self.models_dir), "STEP1X_COALESCE_MS": "0",
        }
        self.settings = Settings.model_validate({**{k.removeprefix("STEP1X_").lower(): v for k, v in self.env.items()},
                                                 "models": self.profiles})
        if self.profiles:
            self.env["STEP1X_MODELS"] = json.dumps(self.profiles)
        upgrade(self.settings.database_url)
        Storage(self.settings).ensure_bucket()
        with session_scope(self.settings.database_url) as session:
            self.key = create_key(session, "bench")
        self.start_api()

    def start_api(self) -> None:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        log = (self.workdir / "api.log").open("ab")
        self.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"],
            env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM))
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"the API did not start: {(self.workdir / 'api.log').read_text()[-2000:]}")

    def stop_api(self) -> None:
        if self.api is not None:
            launcher.stop_all([self.api])
            self.api = None

    def client(self, timeout: float = 600) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=timeout, headers={"Authorization": f"Bearer {self.key}"})

    def start_worker(self, models: Sequence[str] | None = None, **env: str) -> None:
        """A worker on this stack; `env` adds or overrides its STEP1X_* variables."""
        self.workers = launcher.start_workers([], self.workdir / "logs", "WARNING", env={**self.env, **env},
                                              models=models)
        # Ready when the pool child has started.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not psutil.Process(self.workers[0].pid).children(recursive=True):
            time.sleep(0.1)
        time.sleep(1.0)

    def stop_worker(self) -> None:
        if self.workers:
            launcher.stop_all(self.workers)
            self.workers = []

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far: the worker pool process's task thread (forward passes, claims), its
        other threads (storing, uploads, heartbeats), its engine process, and every other process on
        the machine (`other_processes`), which are split into PostgreSQL, SeaweedFS, Redis, the API,
        this bench and the rest (Celery's main process, the kernel's threads)."""
        pool = psutil.Process(self.workers[0].pid).children()[0]
        # The task runs on the pool process's main thread, whose thread id is the process id.
        threads = {t.id: t.user_time + t.system_time for t in pool.threads()}
        task = threads.pop(pool.pid)
        hosts = {child.pid for child in pool.children()}  # the engine process (STEP1X_ENGINE_PROCESS)
        roots = {"postgres": self.postgres.process.pid, "s3": self.s3.process.pid, "redis": self.redis.process.pid}
        if self.api is not None:
            roots["api"] = self.api.pid
        groups = {os.getpid(): "bench"}
        for name, root in roots.items():
            with suppress(psutil.Error):
                process = psutil.Process(root)
                groups |= {p.pid: name for p in (process, *process.children(recursive=True))}
        spent = dict.fromkeys(("engine_process", *PROCESS_GROUPS), 0.0)
        for process in psutil.process_iter():
            with suppress(psutil.Error):
                if process.pid != pool.pid:
                    times = process.cpu_times()
                    group = "engine_process" if process.pid in hosts else groups.get(process.pid, "rest")
                    spent[group] += times.user + times.system
        machine = sum(seconds for group, seconds in spent.items() if group != "engine_process")
        return {"task_thread": task, "other_threads": sum(threads.values()), "other_processes": machine, **spent}

    def engine_page_faults(self) -> int:
        """Minor page faults so far of the worker's engine process (STEP1X_ENGINE_PROCESS): memory
        it faulted in, each page zeroed by the kernel. Linux (/proc)."""
        pool = psutil.Process(self.workers[0].pid).children()[0]
        # /proc/PID/stat: the 10th field, the 8th after the command name's closing parenthesis.
        return sum(int(Path(f"/proc/{host.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
                   for host in pool.children())

    def worker_rss(self) -> int:
        """Resident bytes of the worker: the main process and its pool child."""
        main = psutil.Process(self.workers[0].pid)
        return sum(p.memory_info().rss for p in [main, *main.children(recursive=True)])
