"""The Python client users import, and the one the `step1x` command uses.

    from step1x.client import Client
    client = Client("http://127.0.0.1:8000", api_key)
    batch = client.submit_manifest("catalog.jsonl")
    client.wait_batch(batch["id"], on_progress=print)
    client.download_results(batch["id"], "out/")
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from core.errors import Step1XError

FILE_FIELDS = ("image", "mask", "edges")
FILE_ID = re.compile(r"^[0-9a-f]{64}$")
TERMINAL = {"completed", "failed", "canceled"}


class APIError(Step1XError):
    """The API answered with an error; `errors` lists bad items and fields for a 422."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.status, self.detail, self.errors = status, detail, errors or []
        lines = [f"HTTP {status}: {detail}"]
        lines += [f"  {e.get('item') or '-'} / {e.get('field')}: {e.get('message')}" for e in self.errors[:50]]
        super().__init__("\n".join(lines))


class Client:
    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {api_key}"})

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
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
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll)

    # batches
    def create_batch(self, items: Sequence[dict[str, Any]], metadata: dict[str, Any] | None = None,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/batches", headers=self._idem(idempotency_key),
                                            json={"items": list(items), "metadata": metadata or {}})
        return result

    def submit_manifest(self, path: str | Path, metadata: dict[str, Any] | None = None,
                        idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a JSONL manifest. Fields image/mask/edges may name local files (relative to the
        manifest), uploaded first and replaced by their file ids, or http(s) URLs, passed through."""
        path = Path(path)
        items = [json.loads(line) for line in path.read_text().splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        return self.create_batch(self.resolve_files(items, path.parent), metadata, idempotency_key)

    def resolve_files(self, items: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
        uploaded: dict[Path, str] = {}
        for item in items:
            for field in FILE_FIELDS:
                value = item.get(field)
                if not isinstance(value, str) or FILE_ID.match(value) or value.startswith(("http://", "https://")):
                    continue  # file ids and URLs go through as they are (the service fetches URLs)
                local = (base / value).resolve()
                if not local.is_file():
                    raise APIError(422, "manifest names a file that does not exist",
                                   [{"item": item.get("custom_id"), "field": field, "message": f"no file {value}"}])
                if local not in uploaded:
                    uploaded[local] = self.upload_file(local)["id"]
                item[field] = uploaded[local]
        return items

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
        deadline = time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id)
            if on_progress:
                on_progress(batch)
            if batch["status"] in TERMINAL:
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout}s")
            time.sleep(poll)

    def download_results(self, batch_id: str, out_dir: str | Path,
                         on_file: Callable[[Path], None] | None = None) -> list[Path]:
        """Every output, named by custom_id (extra images per prompt get -1, -2, ...)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for line in self.results(batch_id):
            for index, url in enumerate(line.get("urls", [])):
                safe = re.sub(r"[^A-Za-z0-9._-]", "_", line["custom_id"] or line["job_id"])
                target = out / (f"{safe}-{index}.png" if index else f"{safe}.png")
                response = httpx.get(url, timeout=120)
                response.raise_for_status()
                target.write_bytes(response.content)
                paths.append(target)
                if on_file:
                    on_file(target)
        return paths
