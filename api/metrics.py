"""`/metrics` in the Prometheus text format.

The API exposes what the database knows, computed once per scrape by a custom collector (never per
page request): jobs by status and model, queue depth and oldest queued age per lane, workers'
memory and heartbeat age, paused queues, webhook deliveries by status and endpoints by state.
Histograms of micro-batch sizes and stage durations are recorded where the work happens: each
worker process serves its own /metrics (see `workers.telemetry`), so workers on any number of hosts
are scraped directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from core import monitor
from core.db import session_scope
from core.dispatch import LANES
from core.pauses import paused
from core.settings import Settings
from core.tables import Job, WebhookDelivery, WebhookEndpoint, utcnow

router = APIRouter(include_in_schema=False)
DELIVERY_STATUSES = ("pending", "succeeded", "failed")


class DatabaseCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        jobs = GaugeMetricFamily("step1x_jobs", "Jobs by status and model", labels=["status", "model"])
        depth = GaugeMetricFamily("step1x_queue_depth", "Queued jobs per lane", labels=["lane"])
        running = GaugeMetricFamily("step1x_queue_running", "Running jobs per lane", labels=["lane"])
        oldest = GaugeMetricFamily("step1x_queue_oldest_age_seconds",
                                   "Age of the oldest queued job per lane (0 when none)", labels=["lane"])
        rss = GaugeMetricFamily("step1x_worker_rss_bytes", "Worker resident memory, as last reported",
                                labels=["worker"])
        gpu = GaugeMetricFamily("step1x_worker_gpu_memory_bytes", "GPU memory allocated by the worker",
                                labels=["worker"])
        heartbeat = GaugeMetricFamily("step1x_worker_heartbeat_age_seconds", "Seconds since the last heartbeat",
                                      labels=["worker"])
        pauses = GaugeMetricFamily("step1x_queue_paused", "1 for each paused lane or model", labels=["scope", "name"])
        hooks = GaugeMetricFamily("step1x_webhook_deliveries", "Webhook deliveries by status: pending (not yet "
                                  "sent, or waiting for a retry), succeeded, failed (gave up)", labels=["status"])
        overdue = GaugeMetricFamily("step1x_webhook_due_age_seconds",
                                    "How long the longest-waiting due delivery has waited (0 when none)")
        endpoints = GaugeMetricFamily("step1x_webhook_endpoints", "Webhook endpoints by state", labels=["state"])
        with session_scope(self.settings.database_url) as session:
            for status, model, n in session.execute(select(Job.status, Job.model, func.count())
                                                    .group_by(Job.status, Job.model)):
                jobs.add_metric([status, model], n)
            lanes = {q.name: q for q in monitor.queues(session, "lane")}
            for lane in sorted({*LANES, *lanes}):
                queue = lanes.get(lane, monitor.Queue(lane))
                depth.add_metric([lane], queue.queued)
                running.add_metric([lane], queue.running)
                oldest.add_metric([lane], queue.oldest_age(now) or 0.0)
            for worker in monitor.workers(session):
                if worker.rss_bytes is not None:
                    rss.add_metric([worker.name], worker.rss_bytes)
                if worker.gpu_memory_bytes is not None:
                    gpu.add_metric([worker.name], worker.gpu_memory_bytes)
                heartbeat.add_metric([worker.name], (now - worker.heartbeat_at).total_seconds())
            for pause in paused(session):
                pauses.add_metric([pause.scope, pause.name], 1)
            self._webhooks(session, now, hooks, overdue, endpoints)
        yield from (jobs, depth, running, oldest, rss, gpu, heartbeat, pauses, hooks, overdue, endpoints)

    @staticmethod
    def _webhooks(session: Session, now: datetime, hooks: GaugeMetricFamily, overdue: GaugeMetricFamily,
                  endpoints: GaugeMetricFamily) -> None:
        # Counted from the index (status, next_attempt_at): no table rows are read.
        counts = dict(session.execute(select(WebhookDelivery.status, func.count())
                                      .group_by(WebhookDelivery.status)).tuples().all())
        for status in sorted({*DELIVERY_STATUSES, *counts}):
            hooks.add_metric([status], counts.get(status, 0))
        # A sender's lease moves next_attempt_at ahead, so what is still past due waits for a sender.
        due = session.scalar(select(func.min(WebhookDelivery.next_attempt_at))
                             .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now))
        overdue.add_metric([], (now - due).total_seconds() if due else 0.0)
        states = dict(session.execute(select(WebhookEndpoint.enabled, func.count())
                                      .group_by(WebhookEndpoint.enabled)).tuples().all())
        endpoints.add_metric(["enabled"], states.get(True, 0))
        endpoints.add_metric(["disabled"], states.get(False, 0))


def registry_for(settings: Settings) -> CollectorRegistry:
    """A registry per app (not the process-global one), so several apps in one process stay apart."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings))
    return registry


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, request.app.state.metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
