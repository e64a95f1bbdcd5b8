"""The Celery app the workers and beat run: `celery -A workers.app worker` / `celery -A workers.app beat`.

Its configuration lives in `core.dispatch`, shared with the API that sends the tasks.
"""

from core.dispatch import app_for
from core.settings import get_settings

settings = get_settings()
app = app_for(settings)
# Where an embedded beat (`step1x up`) keeps its schedule: inside the data folder, not the cwd.
settings.data_dir.mkdir(parents=True, exist_ok=True)
app.conf.beat_schedule_filename = str(settings.data_dir / "celerybeat-schedule")

import workers.deliver  # noqa: E402  (webhook deliveries and URL fetches, on the control queue)
import workers.signals  # noqa: E402  (registers timing/logging hooks)
import workers.tasks  # noqa: E402,F401  (registers the tasks on `app`)
