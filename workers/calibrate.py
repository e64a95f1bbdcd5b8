"""`step1x worker --calibrate`: before the workers start, measure each model profile they serve on
their device and store the best micro-batch in the `calibrations` table, where the planner reads it.

Run as `python -m workers.calibrate --models a,b --worker NAME`, once per device (the launcher pins
it with CUDA_VISIBLE_DEVICES like the worker it precedes).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from core.db import session_scope
from core.errors import Step1XError
from core.settings import Settings, get_settings
from core.tables import Calibration, utcnow
from models.calibrate import calibrate, device_name
from models.profiles import create_engine

log = logging.getLogger(__name__)


def calibrate_models(settings: Settings, models: Sequence[str], worker: str) -> list[Calibration]:
    device = device_name()
    stored = []
    for name in models:
        profile = settings.models[name]
        try:
            engine = create_engine(name, settings)
        except Step1XError as exc:  # weights not installed: nothing to measure, the worker says so later
            log.warning("calibration of %s skipped: %s", name, exc)
            continue
        result = calibrate(engine, profile)
        row = Calibration(profile=name, device=device, batch_size=result.batch_size,
                          pixel_budget=result.pixel_budget, images_per_s=result.images_per_s,
                          trials=result.trials, worker=worker, measured_at=utcnow())
        with session_scope(settings.database_url) as session:
            session.merge(row)
        log.warning("calibrated %s on %s: batch of %d (%d px) at %.2f images/s (profile guessed %d px); trials %s",
                    name, device, result.batch_size, result.pixel_budget, result.images_per_s,
                    profile.pixel_budget, result.trials)
        stored.append(row)
    return stored


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.calibrate")
    parser.add_argument("--models", required=True, help="comma-separated model profiles")
    parser.add_argument("--worker", default="worker", help="the worker's name, recorded with the figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    calibrate_models(get_settings(), [m for m in args.models.split(",") if m], args.worker)


if __name__ == "__main__":
    main()
