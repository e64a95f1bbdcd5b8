"""docker-compose.yml is consistent with the code: no Docker engine runs here, so check what a parser can."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.dispatch import LANES, queue_for
from core.settings import Settings
from workers.launcher import QUIET, worker_commands

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
APP_SERVICES = ("api", "control")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    return dict(loaded["services"])


def _workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: service for name, service in services.items() if name.startswith("worker")}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def test_the_stack_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "redis", "minio", "createbucket", *APP_SERVICES} <= set(services)
    assert _workers(services)


def test_every_step1x_variable_is_a_settings_field(services: dict[str, dict[str, Any]]) -> None:
    fields = {name.upper() for name in Settings.model_fields}
    used = {key for service in services.values() for key in _environment(service)
            if key.startswith("STEP1X_")}
    assert used, "the app services carry no STEP1X_ environment"
    # STEP1X_MODELS__NAME sets a nested value of the `models` field.
    unknown = {key for key in used if key.removeprefix("STEP1X_").split("__")[0] not in fields}
    assert not unknown, f"not fields of core.settings.Settings: {sorted(unknown)}"


def test_app_services_share_the_production_environment(services: dict[str, dict[str, Any]]) -> None:
    environments = [_environment(services[name]) for name in (*APP_SERVICES, *_workers(services))]
    assert all(env == environments[0] for env in environments)
    assert environments[0]["STEP1X_ENVIRONMENT"] == "production"
    assert environments[0]["STEP1X_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in environments[0]["STEP1X_DATABASE_URL"]
    assert environments[0]["STEP1X_REDIS_URL"].startswith("redis://redis:")
    assert environments[0]["STEP1X_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_each_worker_owns_one_distinct_gpu(services: dict[str, dict[str, Any]]) -> None:
    gpus: list[str] = []
    for name, worker in _workers(services).items():
        [device] = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1, f"{name} must be pinned to exactly one GPU"
        gpus.append(str(device["device_ids"][0]))
        # The launcher builds the Celery command, so the queues are those of the configured models
        # (`bulk.<model>`, ...), the ones the API sends to; the container's one GPU is its index 0.
        # Node names are gpu0@<container hostname>: distinct as long as no worker fixes a hostname.
        assert _command(worker).split(" --loglevel")[0] == "step1x worker --gpus 0"
        assert "hostname" not in worker, f"{name} would share its Celery node name with its copies"
        # Docker's stop must not kill the launcher's warm shutdown (stop_all: 20 s) midway.
        assert worker.get("init") is True and int(worker["stop_grace_period"].removesuffix("s")) > 20
    assert len(set(gpus)) == len(gpus), f"two workers share a GPU: {gpus}"


def test_the_workers_consume_the_queues_the_api_sends_to() -> None:
    """The compose workers run `step1x worker`, whose Celery command this is: every queue a
    micro-batch of a configured model can be sent to is consumed."""
    settings = Settings(compute="cuda")
    [(_, argv, _)] = worker_commands(["0"], models=list(settings.models))
    consumed = argv[argv.index("-Q") + 1].split(",")
    assert {queue_for(lane, model) for lane in LANES for model in settings.models} <= set(consumed)


def test_one_control_process_runs_the_reconciler_and_beat(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["control"])
    assert command.startswith("celery -A workers.control worker")
    assert "-Q control" in command and "--pool threads" in command and "--beat" in command
    assert set(QUIET) <= set(command.split()), "the control process here starts as the launcher's does"
    beats = [name for name, service in services.items() if "--beat" in _command(service)
             or " beat" in _command(service).split(" worker")[0]]
    assert beats == ["control"]
    # Inference workers never take control work: `step1x worker` without --beat consumes model queues only.
    assert all("--beat" not in _command(worker) for worker in _workers(services).values())


def test_backing_services_and_api_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in ("postgres", "redis", "minio", "api"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_api_waits_for_healthy_database_and_broker(services: dict[str, dict[str, Any]]) -> None:
    depends = services["api"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    assert "api.app:create_app --factory" in _command(services["api"])


def test_createbucket_makes_the_configured_bucket(services: dict[str, dict[str, Any]]) -> None:
    made = re.findall(r"mc mb (?:--ignore-existing )?local/([\w.-]+)", _command(services["createbucket"]))
    assert made == [_environment(services["api"])["STEP1X_S3_BUCKET"]]
    assert services["createbucket"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_prometheus_scrapes_the_api_and_every_worker(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    [mount] = [v for v in prometheus["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")]
    config = yaml.safe_load((COMPOSE.parent / mount.split(":")[0]).read_text())
    targets = {target for job in config["scrape_configs"] for group in job["static_configs"]
               for target in group["targets"]}
    api_port = re.search(r"--port (\d+)", _command(services["api"]))
    assert api_port and f"api:{api_port.group(1)}" in targets
    port = _environment(services["api"])["STEP1X_WORKER_METRICS_PORT"]
    # Each worker is a container of its own (its GPU is device 0 inside), so all serve the same port.
    assert {f"{name}:{port}" for name in _workers(services)} <= targets
    assert all(target.split(":")[0] in services for target in targets)
