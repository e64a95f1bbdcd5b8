"""A due delivery is sent once however many senders reach for it at the same instant, on SQLite too
(the embedded default), which has no SELECT ... FOR UPDATE SKIP LOCKED to keep them apart."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from core.db import session_scope, upgrade
from core.delivery import deliver
from core.services import free_port
from core.settings import Settings
from core.tables import Tenant, WebhookAttempt, WebhookDelivery, WebhookEvent
from core.webhooks import create_endpoint
from tests.integration import receiver as fixtures
from tests.integration.receiver import Receiver

pytestmark = pytest.mark.integration
outbound = fixtures.outbound


def test_concurrent_senders_on_sqlite_send_a_due_delivery_once(outbound: Settings, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'step1x.db'}"
    upgrade(url)
    settings = outbound.model_copy(update={"database_url": url})
    server = Receiver("127.0.0.1", free_port()).start()
    try:
        ids = []
        with session_scope(url) as session:
            session.add(Tenant(id="acme"))
            endpoint = create_endpoint(session, settings, "acme", server.url, ["job.canceled"])
            for i in range(5):
                event = WebhookEvent(tenant_id="acme", type="job.canceled", resource_id=f"job_{i}", sequence=1,
                                     payload={"type": "job.canceled", "data": {}})
                session.add(event)
                session.flush()
                row = WebhookDelivery(event_id=event.id, tenant_id="acme", endpoint_id=endpoint.id)
                session.add(row)
                session.flush()
                ids.append(row.id)
        for delivery_id in ids:
            start = threading.Barrier(6)

            def send(delivery_id: str = delivery_id, start: threading.Barrier = start) -> None:
                start.wait()
                deliver(settings, delivery_id, burst=1)

            senders = [threading.Thread(target=send) for _ in range(6)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
        assert sorted(seen.headers["webhook-id"] for seen in server.seen) == sorted(ids)
        with session_scope(url) as session:
            assert session.scalar(select(func.count()).select_from(WebhookAttempt)) == len(ids)
    finally:
        server.stop()
