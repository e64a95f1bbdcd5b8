"""The workers' PUTs and GETs are signed exactly as botocore signs them: the reference implementation of SigV4."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from core.storage import ObjectClient


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://s3.example.test", "http://s3.example.test:80/"])
@pytest.mark.parametrize("key", ["outputs/acme/bat_1/job_2.png", "outputs/a tenant/été+1=~x/job.webp"])
@pytest.mark.parametrize(("method", "data", "content_type"), [("PUT", b"\x89PNG payload", "image/png"),
                                                              ("GET", b"", None)])
def test_the_signature_is_botocores(endpoint: str, key: str, method: str, data: bytes,
                                    content_type: str | None) -> None:
    client = ObjectClient(endpoint, "eu-west-3", "AKIDEXAMPLE", "secret/with+chars", connections=1, attempts=1)
    path = quote(f"/bucket/{key}", safe="/~")
    digest = client.headers(method, path, data, content_type)["x-amz-content-sha256"]
    reference = AWSRequest(method, f"{endpoint.rstrip('/')}{path}", data=data, headers={
        **({"Content-Type": content_type} if content_type else {}), "X-Amz-Content-SHA256": digest})
    S3SigV4Auth(Credentials("AKIDEXAMPLE", "secret/with+chars"), "s3", "eu-west-3").add_auth(reference)
    signed_at = datetime.strptime(reference.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    ours = client.headers(method, path, data, content_type, now=signed_at)

    assert ours["authorization"] == reference.headers["Authorization"]
    assert ours["x-amz-date"] == reference.headers["X-Amz-Date"]


def test_another_day_another_signing_key() -> None:
    client = ObjectClient("http://127.0.0.1:8333", "us-east-1", "AKIDEXAMPLE", "secret", connections=1, attempts=1)
    monday = client.headers("PUT", "/b/k", b"x", "image/png", now=datetime(2026, 12, 7, 23, 59, tzinfo=UTC))
    tuesday = client.headers("PUT", "/b/k", b"x", "image/png", now=datetime(2026, 12, 8, 0, 1, tzinfo=UTC))
    assert "20261207/us-east-1/s3" in monday["authorization"]
    assert "20261208/us-east-1/s3" in tuesday["authorization"]
