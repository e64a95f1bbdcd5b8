"""The light control process: `celery -A workers.control worker -Q control -P threads --beat`.

It runs the reconciler, webhook deliveries and URL fetches (and the beat that schedules them) apart
from the inference workers, so recovery never waits behind a micro-batch, and it never imports
torch: it starts in a second and stays small. Its configuration is the same app as the workers' (`core.dispatch`).
"""

from __future__ import annotations

from core.dispatch import RECONCILE, app_for
from core.settings import get_settings
from workers.reconcile import reconcile

settings = get_settings()
app = app_for(settings)
# Where beat keeps its schedule: inside the data folder, not the working directory.
settings.data_dir.mkdir(parents=True, exist_ok=True)
app.conf.beat_schedule_filename = str(settings.data_dir / "celerybeat-schedule")

import workers.deliver  # noqa: E402  (webhook deliveries and URL fetches)
import workers.signals  # noqa: E402,F401  (registers timing/logging hooks)


@app.task(name=RECONCILE, acks_late=False)
def reconcile_task() -> dict[str, int]:
    # Acknowledged on receipt, like every task of this process: the beat sends the next pass, so a
    # lost message costs nothing. And a message left unacknowledged when Redis goes away made
    # kombu's reconnect fail (an AttributeError while restoring it, which Celery treats as
    # unrecoverable): the control process exited, and with it the recovery from that very outage.
    return reconcile(get_settings())
