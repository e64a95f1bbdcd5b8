"""While PostgreSQL is down, every route answers 503 with Retry-After in the JSON error shape
(the auth dependency included), and the API serves again once it is back."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.db import session_scope, upgrade
from core.keys import create_key
from core.services import start_postgres
from core.settings import Settings
from tests.integration.helpers import png

pytestmark = pytest.mark.integration

ID = "0123456789abcdef" * 2
PATH_IDS = {"job_id": f"job_{ID}", "batch_id": f"bat_{ID}", "file_id": ID * 2, "endpoint_id": f"whe_{ID}",
            "delivery_id": f"msg_{ID}"}
JOB = {"kind": "generate", "prompt": "a mug", "width": 64, "height": 64}


def request_for(client: TestClient, method: str, path: str) -> tuple[int, dict[str, str], dict]:
    """One plausible request per route; routes this file does not know get an empty JSON object."""
    url = path.format(**{name: PATH_IDS.get(name, ID) for name in PATH_IDS | {"id": ""}})
    if path == "/v1/files" and method == "POST":
        response = client.post(url, files={"file": ("a.png", png((16, 16)))})
    elif path == "/v1/batches/manifest":
        response = client.post(url, content=b'{"custom_id": "a", "kind": "generate", "prompt": "x"}\n',
                               headers={"Content-Type": "application/x-ndjson"})
    elif path == "/v1/batches" and method == "POST":
        response = client.post(url, json={"items": [{"custom_id": "a", **JOB}]})
    elif path == "/v1/jobs" and method == "POST":
        response = client.post(url, json=JOB)
    else:
        response = client.request(method, url, json={} if method in ("POST", "PUT", "PATCH") else None)
    return response.status_code, dict(response.headers), response.json() if response.content else {}


def test_every_route_answers_503_while_the_database_is_down(settings: Settings, service_workdir: Path) -> None:
    with start_postgres(service_workdir) as postgres:
        url = postgres.create_database("outage")
        upgrade(url)
        with session_scope(url) as session:
            key = create_key(session, "acme")
        own = settings.model_copy(update={"database_url": url})
        app = create_app(own, migrate=False)
        client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
        assert client.get(f"/v1/jobs/job_{ID}").status_code == 404  # up: authenticated, no such job

        postgres.stop()
        routes = [(method.upper(), path) for path, operations in app.openapi()["paths"].items()
                  for method in operations if path != "/healthz"]
        assert len(routes) >= 12
        wrong = []
        for method, path in routes:
            status, headers, body = request_for(client, method, path)
            if path == "/readyz":
                ok = status == 503 and body["checks"]["database"] != "ok"
            else:
                ok = (status == 503 and int(headers.get("retry-after", "0")) > 0
                      and body["errors"][0]["field"] == "database")
            if not ok:
                wrong.append(f"{method} {path}: {status} {body}")
        assert not wrong, "\n".join(wrong)
        assert client.get("/healthz").status_code == 200  # liveness checks no dependency

        restarted = start_postgres(service_workdir, port=postgres.port)
        with restarted:
            assert client.get(f"/v1/jobs/job_{ID}").status_code == 404  # back: the pool reconnects
