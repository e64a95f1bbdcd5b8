"""The output PUT is signed exactly as botocore signs it: the reference implementation of SigV4."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from core.storage import PutClient


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8333", "https://s3.example.test", "http://s3.example.test:80/"])
@pytest.mark.parametrize("key", ["outputs/acme/bat_1/job_2.png", "outputs/a tenant/été+1=~x/job.webp"])
def test_the_signature_is_botocores(endpoint: str, key: str) -> None:
    client = PutClient(endpoint, "eu-west-3", "AKIDEXAMPLE", "secret/with+chars", connections=1, attempts=1)
    data = b"\x89PNG payload"
    path = quote(f"/bucket/{key}", safe="/~")
    reference = AWSRequest("PUT", f"{endpoint.rstrip('/')}{path}", data=data, headers={
        "Content-Type": "image/png", "X-Amz-Content-SHA256": client.headers(path, data, "image/png")[
            "X-Amz-Content-SHA256"]})
    S3SigV4Auth(Credentials("AKIDEXAMPLE", "secret/with+chars"), "s3", "eu-west-3").add_auth(reference)
    signed_at = datetime.strptime(reference.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

    ours = client.headers(path, data, "image/png", now=signed_at)

    assert ours["Authorization"] == reference.headers["Authorization"]
    assert ours["X-Amz-Date"] == reference.headers["X-Amz-Date"]


def test_another_day_another_signing_key() -> None:
    client = PutClient("http://127.0.0.1:8333", "us-east-1", "AKIDEXAMPLE", "secret", connections=1, attempts=1)
    monday = client.headers("/b/k", b"x", "image/png", now=datetime(2026, 12, 7, 23, 59, tzinfo=UTC))
    tuesday = client.headers("/b/k", b"x", "image/png", now=datetime(2026, 12, 8, 0, 1, tzinfo=UTC))
    assert "20261207/us-east-1/s3" in monday["Authorization"]
    assert "20261208/us-east-1/s3" in tuesday["Authorization"]
