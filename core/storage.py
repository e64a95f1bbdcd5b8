"""Object storage through boto3: any S3-compatible service (SeaweedFS, MinIO, AWS S3).

Keys are deterministic (`outputs/{tenant}/{batch}/{job}.png`), so a job that runs twice overwrites
its output instead of leaving a duplicate.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Any
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from core.errors import NotFound, ServiceUnavailable
from core.formats import CONTENT_TYPES, EXTENSIONS
from core.settings import Settings


def input_key(tenant: str, file_id: str) -> str:
    return f"inputs/{tenant}/{file_id}"


def output_prefix(tenant: str, batch_id: str | None) -> str:
    return f"outputs/{tenant}/{batch_id or 'single'}/"


def output_key(tenant: str, batch_id: str | None, job_id: str, index: int = 0, output_format: str = "png") -> str:
    suffix = "" if index == 0 else f"-{index}"
    return f"{output_prefix(tenant, batch_id)}{job_id}{suffix}.{EXTENSIONS[output_format]}"


def format_of(key: str) -> str:
    """The output format a stored key was written in (its extension)."""
    extension = key.rsplit(".", 1)[-1]
    return next((f for f, ext in EXTENSIONS.items() if ext == extension), "png")


def attachment(filename: str) -> str:
    """A Content-Disposition for a download named after user text (RFC 6266): an ASCII `filename`
    for old clients, and the exact name percent-encoded in UTF-8 as `filename*` (RFC 5987).
    Quotes, backslashes, path separators and control characters never reach the header."""
    name = re.sub(r'[\x00-\x1f\x7f-\x9f/\\]', "_", filename) or "download"
    fallback = re.sub(r'[^ -~]|["%]', "_", name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='!#$&+-.^_`|~')}"


def _no_expect_continue(request: Any, **_: Any) -> None:
    if "Expect" in request.headers:
        del request.headers["Expect"]


class Storage:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket

    def _client(self, endpoint: str | None) -> Any:
        s = self.settings
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=s.s3_region,
            aws_access_key_id=s.s3_access_key, aws_secret_access_key=s.s3_secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          retries={"max_attempts": s.s3_max_attempts, "mode": "standard"},
                          # one connection per upload thread, plus room for reads alongside
                          max_pool_connections=s.upload_concurrency + 2),
        )
        # botocore sends "Expect: 100-continue" with every PUT body: one more round trip per object.
        # Outputs are small and the request is signed, so there is nothing to ask permission for.
        client.meta.events.register("before-sign.s3.PutObject", _no_expect_continue)
        return client

    @cached_property
    def client(self) -> Any:
        return self._client(self.settings.s3_endpoint_url)

    @cached_property
    def public_client(self) -> Any:
        """Signs URLs for the address clients see, which may differ from the workers' address."""
        public = self.settings.s3_public_endpoint_url
        return self._client(public) if public else self.client

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        try:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(f"object {key!r} is not in bucket {self.bucket!r}") from exc
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def copy(self, source_key: str, key: str) -> None:
        self.client.copy_object(Bucket=self.bucket, Key=key,
                                CopySource={"Bucket": self.bucket, "Key": source_key})

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many there were."""
        deleted = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
        return deleted

    def presign_get(self, key: str, filename: str | None = None) -> str:
        """A GET URL that serves the object with its image type and, given a file name, as a
        download under that name (any characters, safely encoded)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key,
                                  "ResponseContentType": CONTENT_TYPES[format_of(key)]}
        if filename:
            params["ResponseContentDisposition"] = attachment(filename)
        url: str = self.public_client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self.settings.presign_seconds
        )
        return url

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise ServiceUnavailable(f"S3 bucket {self.bucket!r} at {self.settings.s3_endpoint_url} "
                                     f"is unreachable: {exc}") from exc
