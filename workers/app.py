"""The Celery app the inference workers run: `celery -A workers.app worker`.

Its configuration lives in `core.dispatch`, shared with the API that sends the tasks; the
reconciler and beat run in the control process (`workers.control`).
"""

from core.dispatch import app_for
from core.settings import get_settings

settings = get_settings()
app = app_for(settings)

import workers.deliver  # noqa: E402  (webhook deliveries and URL fetches, on the control queue)
import workers.registry  # noqa: E402  (the heartbeat into the workers table)
import workers.signals  # noqa: E402  (registers timing/logging hooks)
import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)
