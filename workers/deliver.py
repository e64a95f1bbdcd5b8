"""Outbound work on the control queue: webhook deliveries, URL input fetches, and the periodic pass
that finds whatever is due (retries, and anything whose message Redis lost). Thin shims: the work
is in `core.delivery` and `core.fetch`.

No torch here: the light control process can run these alone
(`celery -A workers.deliver worker -Q control -P threads`); `workers.app` registers them too.
"""

from __future__ import annotations

from functools import cache

from core import delivery, fetch
from core.dispatch import OUTBOUND_DUE, app_for
from core.settings import get_settings
from core.storage import Storage

app = app_for(get_settings())  # the same (cached) app object `workers.app` configures


@cache
def _storage() -> Storage:
    return Storage(get_settings())


@app.task(name=delivery.DELIVER, acks_late=False)
def deliver_task(delivery_id: str) -> str | None:
    # Acknowledged on receipt: the outbox row, not the message, guarantees the delivery.
    return delivery.deliver(get_settings(), delivery_id)


@app.task(name=fetch.FETCH, acks_late=False)
def fetch_task(resource: str) -> int:
    return fetch.run(get_settings(), _storage(), resource)


@app.task(name=OUTBOUND_DUE, acks_late=False)
def outbound_due_task() -> dict[str, int]:
    settings = get_settings()
    deliveries = delivery.due(settings)
    if deliveries:
        delivery.kick(deliveries, settings)
    resources = fetch.due(settings)
    if resources:
        fetch.kick(resources, settings)
    return {"deliveries": len(deliveries), "fetches": len(resources)}
