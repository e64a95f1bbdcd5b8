"""The child services really start, serve, stop, keep their data, and die with their parent."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from botocore.exceptions import ClientError
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.errors import NotFound, ServiceUnavailable
from core.services import (
    ChildService,
    s3_client,
    start_postgres,
    start_redis,
    start_seaweedfs,
)
from core.settings import Settings
from core.storage import ObjectError, Storage
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _port_is_free(port: int) -> bool:
    """Bindable by a server: with SO_REUSEADDR, as servers bind, connections left in TIME_WAIT don't count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_redis_ping_set_get(redis_service: ChildService) -> None:
    client = redis.Redis.from_url(redis_service.url)
    assert client.ping()
    client.set("step1x:probe", b"value")
    assert client.get("step1x:probe") == b"value"


def test_postgres_select_and_table_round_trip(postgres_service: ChildService) -> None:
    assert _query(postgres_service.url, "select 1") == [(1,)]
    _query(postgres_service.url, "create table round_trip (id int primary key, name text)")
    try:
        _query(postgres_service.url, "insert into round_trip values (1, 'astronaut'), (2, 'coffee')")
        assert _query(postgres_service.url, "select name from round_trip order by id") == [
            ("astronaut",), ("coffee",)]
    finally:
        _query(postgres_service.url, "drop table round_trip")


@pytest.fixture
def bucket(s3_service: ChildService) -> Iterator[str]:
    name = f"probe-{uuid.uuid4().hex[:12]}"
    s3_client(s3_service.url, S3_ACCESS_KEY, S3_SECRET_KEY).create_bucket(Bucket=name)
    yield name
    s3_client(s3_service.url, S3_ACCESS_KEY, S3_SECRET_KEY).delete_bucket(Bucket=name)


def test_s3_put_get(s3_service: ChildService, bucket: str) -> None:
    client = s3_client(s3_service.url, S3_ACCESS_KEY, S3_SECRET_KEY)
    client.put_object(Bucket=bucket, Key="outputs/a.png", Body=b"\x89PNG-bytes")
    assert client.get_object(Bucket=bucket, Key="outputs/a.png")["Body"].read() == b"\x89PNG-bytes"


def test_s3_presigned_get_serves_the_bytes(s3_service: ChildService, bucket: str) -> None:
    client = s3_client(s3_service.url, S3_ACCESS_KEY, S3_SECRET_KEY)
    client.put_object(Bucket=bucket, Key="shared.bin", Body=b"presigned payload")
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "shared.bin"},
                                        ExpiresIn=60)
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"presigned payload"
    # The signature covers the key: the same query string must not open another object.
    assert httpx.get(url.replace("shared.bin", "other.bin")).status_code == 403


def test_s3_refuses_a_wrong_secret(s3_service: ChildService, bucket: str) -> None:
    intruder = s3_client(s3_service.url, S3_ACCESS_KEY, "not-the-secret")
    with pytest.raises(ClientError) as refused:
        intruder.put_object(Bucket=bucket, Key="x", Body=b"x")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert httpx.get(f"{s3_service.url}/{bucket}/x").status_code == 403


@pytest.mark.parametrize("key", ["outputs/acme/bat_1/job_2.png", "outputs/a tenant/été+1=~x/job (2).webp"])
def test_storage_put_writes_what_boto3_reads(settings: Settings, key: str) -> None:
    storage = Storage(settings)
    storage.put(key, b"\x89PNG output", "image/png")
    stored = storage.client.get_object(Bucket=settings.s3_bucket, Key=key)
    assert stored["Body"].read() == b"\x89PNG output"
    assert stored["ContentType"] == "image/png"
    storage.put(key, b"second run", "image/png")  # a job run twice overwrites its output
    assert storage.get(key) == b"second run"


@pytest.mark.parametrize("key", ["inputs/acme/file_1", "inputs/a tenant/été+1=~x/file (2)"])
def test_storage_get_reads_what_boto3_wrote(settings: Settings, key: str) -> None:
    storage = Storage(settings)
    storage.client.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"\x89PNG input")
    assert storage.get(key) == b"\x89PNG input"
    with pytest.raises(NotFound, match=r"'inputs/acme/nothing' is not in bucket"):
        storage.get("inputs/acme/nothing")
    # A missing bucket is the deployment's trouble, not the item's: retried, never a failed job.
    with pytest.raises(ObjectError, match=r"HTTP 404.*NoSuchBucket"):
        Storage(settings.model_copy(update={"s3_bucket": "no-such-bucket"})).get(key)


def test_storage_put_many_writes_what_boto3_reads(settings: Settings) -> None:
    storage = Storage(settings)
    objects = [(f"outputs/a tenant/été+1=~x/job ({i}).png", f"output {i}".encode(), "image/png") for i in range(40)]
    stored: list[str] = []
    storage.put_many(iter(objects), lambda key, seconds: stored.append(key))
    assert sorted(stored) == sorted(key for key, _, _ in objects)
    for key, data, _ in objects[::7]:
        reply = storage.client.get_object(Bucket=settings.s3_bucket, Key=key)
        assert (reply["Body"].read(), reply["ContentType"]) == (data, "image/png")
    storage.put_many([(objects[0][0], b"second run", "image/png")])  # a job run twice overwrites its output
    assert storage.get(objects[0][0]) == b"second run"


def test_storage_refusals_name_the_key_and_the_status(settings: Settings) -> None:
    Storage(settings).put("inputs/x", b"x", "image/png")
    storage = Storage(settings.model_copy(update={"s3_secret_key": "not-the-secret"}))
    with pytest.raises(ObjectError, match=r"PUT 'outputs/x.png'.*HTTP 403"):
        storage.put("outputs/x.png", b"x", "image/png")
    with pytest.raises(ObjectError, match=r"PUT 'outputs/x.png'.*HTTP 403"):
        storage.put_many([("outputs/x.png", b"x", "image/png")])
    assert not Storage(settings).exists("outputs/x.png")
    with pytest.raises(ObjectError, match=r"GET 'inputs/x'.*HTTP 403"):
        storage.get("inputs/x")


def test_settings_fixture_gives_a_migrated_database_empty_redis_and_a_bucket(settings: Settings) -> None:
    assert str(make_url(settings.database_url).database).startswith("test_")
    assert _query(settings.database_url, "select count(*) from alembic_version") == [(1,)]
    assert redis.Redis.from_url(settings.redis_url).dbsize() == 0
    client = s3_client(settings.s3_endpoint_url or "", settings.s3_access_key, settings.s3_secret_key)
    client.head_bucket(Bucket=settings.s3_bucket)
    assert settings.data_dir.name == "data"


STARTERS: dict[str, Callable[[Path], ChildService]] = {
    "redis": start_redis,
    "postgres": start_postgres,
    "seaweedfs": lambda workdir: start_seaweedfs(workdir, S3_ACCESS_KEY, S3_SECRET_KEY),
}


@pytest.mark.parametrize("name", STARTERS)
def test_stop_frees_the_port(name: str, service_workdir: Path) -> None:
    service = STARTERS[name](service_workdir)
    assert service.alive()
    assert not _port_is_free(service.port)
    service.stop()
    assert not service.alive()
    assert _port_is_free(service.port)


def test_postgres_restart_keeps_data(service_workdir: Path) -> None:
    with start_postgres(service_workdir) as first:
        _query(first.url, "create table kept (note text)")
        _query(first.url, "insert into kept values ('survives a restart')")
    with start_postgres(service_workdir) as second:
        assert _query(second.url, "select note from kept") == [("survives a restart",)]


def test_seaweedfs_restart_keeps_objects(tmp_path: Path) -> None:
    with start_seaweedfs(tmp_path, S3_ACCESS_KEY, S3_SECRET_KEY) as first:
        client = s3_client(first.url, S3_ACCESS_KEY, S3_SECRET_KEY)
        client.create_bucket(Bucket="kept")
        client.put_object(Bucket="kept", Key="k", Body=b"survives a restart")
    with start_seaweedfs(tmp_path, S3_ACCESS_KEY, S3_SECRET_KEY) as second:
        client = s3_client(second.url, S3_ACCESS_KEY, S3_SECRET_KEY)
        assert client.get_object(Bucket="kept", Key="k")["Body"].read() == b"survives a restart"


def test_a_taken_port_fails_with_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        with pytest.raises(ServiceUnavailable, match=r"(?s)exited with code.*Address already in use"):
            start_redis(tmp_path, port=squatter.getsockname()[1])


def test_a_missing_binary_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceUnavailable, match="apt-get install -y redis-server"):
        start_redis(tmp_path)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has exited; only its reaper is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    script = ("import sys, time; from pathlib import Path; from core.services import start_redis; "
              "service = start_redis(Path(sys.argv[1])); print(service.process.pid, flush=True); "
              "time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child_pid)
