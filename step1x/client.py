"""The Python client users import, and the one the `step1x` command uses.

    from step1x.client import Client
    client = Client()  # STEP1X_API_URL / STEP1X_API_KEY, else the local stack and its dev key
    batch = client.submit_manifest("catalog.jsonl")
    client.wait_batch(batch["id"], on_progress=print)
    client.download_results(batch["id"], "out/")
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from core.errors import FieldError, InvalidInput, Step1XError
from core.formats import EXTENSION_OF_TYPE
from core.settings import get_settings

FILE_FIELDS = ("image", "mask", "edges")
FILE_ID = re.compile(r"^[0-9a-f]{64}$")
TERMINAL = {"completed", "failed", "canceled", "expired"}
JOB_TERMINAL = {"succeeded", "failed", "canceled", "expired"}
DEFAULT_URL = "http://127.0.0.1:8000"
DEV_KEY_FILE = "dev-key"


def dev_key_path() -> Path:
    """Where `step1x up` keeps the development key: in the data folder (STEP1X_DATA_DIR)."""
    return get_settings().data_dir / DEV_KEY_FILE


def default_api_key() -> str:
    """STEP1X_API_KEY, else the dev key of the local stack, from any working directory."""
    key = os.environ.get("STEP1X_API_KEY", "").strip()
    if key:
        return key
    path = dev_key_path()
    if path.is_file():
        return path.read_text().strip()
    raise Step1XError(f"no API key: pass --api-key or set STEP1X_API_KEY (or start `step1x up`, which writes "
                      f"a development key to {path})")


class APIError(Step1XError):
    """The API answered with an error; `errors` lists bad items and fields for a 422."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.status, self.detail, self.errors = status, detail, errors or []
        lines = [f"HTTP {status}: {detail}"]
        lines += [f"  {e.get('item') or '-'} / {e.get('field')}: {e.get('message')}" for e in self.errors[:50]]
        super().__init__("\n".join(lines))


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "5")))
    except ValueError:  # an HTTP date: not sent by this server; wait a default
        return 5.0


class Client:
    """`base_url` defaults to STEP1X_API_URL (else http://127.0.0.1:8000); `api_key` to
    STEP1X_API_KEY, else the local stack's development key."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None, busy_wait: float = 3600) -> None:
        base_url = base_url or os.environ.get("STEP1X_API_URL") or DEFAULT_URL
        api_key = api_key or default_api_key()
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}"})
        # How long to keep retrying while the server answers 429 (the tenant's queue is full).
        self.busy_wait = busy_wait

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.busy_wait
        response = self.http.request(method, path, **kwargs)
        # 429: nothing of the request was stored, so sending it again later is safe.
        while response.status_code == 429 and time.monotonic() < deadline:
            time.sleep(min(_retry_after(response), max(0.0, deadline - time.monotonic())))
            response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text}
            detail = body.get("detail")
            raise APIError(response.status_code, detail if isinstance(detail, str) else json.dumps(detail),
                           body.get("errors"))
        return response.json() if response.headers.get("content-type", "").startswith("application/json") \
            else response.text

    @staticmethod
    def _idem(key: str | None) -> dict[str, str]:
        return {"Idempotency-Key": key} if key else {}

    # files
    def upload_file(self, source: str | Path | bytes, filename: str = "upload") -> dict[str, Any]:
        if isinstance(source, str | Path):
            filename, data = Path(source).name, Path(source).read_bytes()
        else:
            data = source
        result: dict[str, Any] = self._call("POST", "/v1/files", files={"file": (filename, data)})
        return result

    # jobs
    def create_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/jobs", json=spec, headers=self._idem(idempotency_key))
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return result

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def wait_job(self, job_id: str, timeout: float = 600, poll: float = 0.25) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["status"] in JOB_TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll)

    # batches
    def create_batch(self, items: Sequence[dict[str, Any]], metadata: dict[str, Any] | None = None,
                     idempotency_key: str | None = None, **terms: Any) -> dict[str, Any]:
        """`terms`: completion_window, output_ttl (seconds or "24h", "7d")."""
        result: dict[str, Any] = self._call("POST", "/v1/batches", headers=self._idem(idempotency_key),
                                            json={"items": list(items), "metadata": metadata or {}, **terms})
        return result

    def submit_manifest(self, path: str | Path, metadata: dict[str, Any] | None = None,
                        idempotency_key: str | None = None, **terms: Any) -> dict[str, Any]:
        """Submit a JSONL manifest. Fields image/mask/edges may name local files (relative to the
        manifest), uploaded first and replaced by their file ids, or http(s) URLs, passed through. The
        lines keep their numbers, so errors name an item by its custom_id or its `line N`, as the API does."""
        path = Path(path)
        text = self.resolve_files(path.read_text(encoding="utf-8"), path.parent)
        params = {k: v for k, v in terms.items() if v is not None}
        if metadata:
            params["metadata"] = json.dumps(metadata)
        headers = {"Content-Type": "application/x-ndjson", **self._idem(idempotency_key)}
        result: dict[str, Any] = self._call("POST", "/v1/batches/manifest", content=text.encode(), params=params,
                                            headers=headers)
        return result

    def resolve_files(self, manifest: str, base: Path) -> str:
        """The manifest with every local path uploaded and replaced by its file id. Lines that are
        not JSON objects are left for the API to report; every missing file is reported at once."""
        local_paths: dict[tuple[int, str], Path] = {}
        items: dict[int, dict[str, Any]] = {}
        missing: list[FieldError] = []
        lines = manifest.splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(item, dict):
                continue
            items[number] = item
            name = item["custom_id"] if isinstance(item.get("custom_id"), str) else f"line {number}"
            for field in FILE_FIELDS:
                value = item.get(field)
                if not isinstance(value, str) or FILE_ID.match(value) or value.startswith(("http://", "https://")):
                    continue  # file ids and URLs go through as they are (the service fetches URLs)
                local = (base / value).resolve()
                if local.is_file():
                    local_paths[(number, field)] = local
                else:
                    missing.append(FieldError(field, f"no file {value} (paths are relative to the manifest)", name))
        if missing:
            raise InvalidInput(missing)
        uploaded: dict[Path, str] = {}
        for (number, field), local in local_paths.items():
            if local not in uploaded:
                uploaded[local] = self.upload_file(local)["id"]
            items[number][field] = uploaded[local]
        for number in {number for number, _ in local_paths}:
            lines[number - 1] = json.dumps(items[number])
        return "\n".join(lines) + "\n"

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/batches/{batch_id}")
        return result

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/batches/{batch_id}/cancel")
        return result

    def iter_jobs(self, batch_id: str, status: str | None = None, page_size: int = 500) -> Iterator[dict[str, Any]]:
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = self._call("GET", f"/v1/batches/{batch_id}/jobs", params=params)
            yield from page["data"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def results(self, batch_id: str) -> list[dict[str, Any]]:
        text = self._call("GET", f"/v1/batches/{batch_id}/results")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_batch(self, batch_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None,
                   timeout: float = 3600, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the batch ends; `on_progress` gets the batch each time its status, counts or
        progress changed."""
        deadline = time.monotonic() + timeout
        seen = None
        while True:
            batch = self.get_batch(batch_id)
            state = (batch["status"], batch["counts"], batch["progress"])
            if on_progress and state != seen:
                on_progress(batch)
            seen = state
            if batch["status"] in TERMINAL:
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout}s")
            time.sleep(poll)

    def download_results(self, batch_id: str, out_dir: str | Path,
                         on_file: Callable[[Path], None] | None = None) -> list[Path]:
        """Every output, named by custom_id (extra images per prompt get -1, -2, ...), with the
        extension of its format (.png, .jpg, .webp)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for line in self.results(batch_id):
            for index, url in enumerate(line.get("urls", [])):
                safe = re.sub(r"[^A-Za-z0-9._-]", "_", line["custom_id"] or line["job_id"])
                response = httpx.get(url, timeout=120)
                response.raise_for_status()
                extension = EXTENSION_OF_TYPE.get(response.headers.get("content-type", "").split(";")[0], "png")
                target = out / (f"{safe}-{index}.{extension}" if index else f"{safe}.{extension}")
                target.write_bytes(response.content)
                paths.append(target)
                if on_file:
                    on_file(target)
        return paths
