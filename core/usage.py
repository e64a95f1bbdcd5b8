"""What work cost: per job (megapixels drawn, denoising steps, compute seconds and the device kind
that spent them) and summed per batch, which is what a catalog team reports on.

A job whose output came from the identical-job cache drew nothing and costs zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.tables import BatchUsage, Job


@dataclass
class Usage:
    megapixels: float = 0.0
    steps: int = 0
    compute_seconds: float = 0.0
    device: str | None = None

    @classmethod
    def of(cls, sizes: Iterable[tuple[int, int]], steps: int, seconds: float, device: str | None) -> Usage:
        return cls(megapixels=round(sum(w * h for w, h in sizes) / 1e6, 6), steps=steps,
                   compute_seconds=round(seconds, 4), device=device)

    def columns(self) -> dict[str, Any]:
        return {"usage_megapixels": self.megapixels, "usage_steps": self.steps,
                "usage_compute_seconds": self.compute_seconds, "usage_device": self.device}


def job_usage(job: Job) -> dict[str, Any] | None:
    """The wire form of a finished job's usage; null until a worker has recorded it."""
    if job.usage_megapixels is None:
        return None
    return {"megapixels": job.usage_megapixels, "steps": job.usage_steps or 0,
            "compute_seconds": job.usage_compute_seconds or 0.0, "device": job.usage_device}


def batch_usage(session: Session, batch_id: str) -> dict[str, Any]:
    """Totals over the batch's jobs, with compute seconds split by device kind: a row per device
    kind, kept by a trigger (core.progress), never a sum over the jobs."""
    rows = session.execute(select(BatchUsage.device, BatchUsage.megapixels, BatchUsage.steps,
                                  BatchUsage.compute_seconds).where(BatchUsage.batch_id == batch_id)).all()
    by_device = {device: round(float(seconds), 4) for device, _, _, seconds in rows if device}
    return {"megapixels": round(sum(float(mp) for _, mp, _, _ in rows), 6),
            "steps": sum(int(steps) for _, _, steps, _ in rows),
            "compute_seconds": round(sum(by_device.values()), 4),
            "compute_seconds_by_device": by_device}
