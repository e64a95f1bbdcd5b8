"""The `step1x` command: run the stack, submit catalogs, fetch results, manage models and keys."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core.errors import Step1XError
from core.settings import Settings, get_settings
from step1x.client import APIError, Client, dev_key_path

app = typer.Typer(help="Step1X Batch: batch image generation for e-commerce catalogs.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
models_app = typer.Typer(help="Model weights.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
console = Console()

ApiUrl = Annotated[str | None, typer.Option(envvar="STEP1X_API_URL",
                                            help="API address [default: http://127.0.0.1:8000]")]
ApiKey = Annotated[str | None, typer.Option(envvar="STEP1X_API_KEY",
                                            help="API key [default: the dev key `step1x up` wrote]")]
Port = Annotated[int, typer.Option(help="the API's port on 127.0.0.1 (must be free)")]


def ensure_port_free(port: int) -> None:
    """Fail at once, before anything starts, when another server holds the API's port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn does: a port left in TIME_WAIT by a stopped stack is free to take.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            reason = "already in use" if exc.errno == errno.EADDRINUSE else "not allowed for this user"
            console.print(f"[red]error:[/] port {port} on 127.0.0.1 is {reason}. Choose another port: "
                          f"`step1x up --port 8017` / `step1x demo --port 8017`, or `make up PORT=8017` / "
                          f"`make demo PORT=8017`.")
            raise typer.Exit(2) from None


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console)


def wait_with_progress(client: Client, batch: dict[str, Any]) -> dict[str, Any]:
    with progress_bar() as bar:
        task = bar.add_task("jobs done", total=batch["total"], detail="")

        def update(b: dict[str, Any]) -> None:
            c = b["counts"]
            detail = f"{c['running']} running, {c['failed']} failed"
            if c.get("expired"):
                detail += f", {c['expired']} expired"
            # progress counts how far the running jobs are, so the bar moves within a long job.
            bar.update(task, completed=b["progress"] * b["total"], detail=detail)

        return client.wait_batch(batch["id"], on_progress=update)


def print_summary(client: Client, batch: dict[str, Any], seconds: float) -> None:
    counts = batch["counts"]
    expired = f", {counts['expired']} expired" if counts.get("expired") else ""
    console.print(f"batch [bold]{batch['id']}[/]: {batch['status']} - {counts['succeeded']} succeeded, "
                  f"{counts['failed']} failed, {counts['canceled']} canceled{expired} of {batch['total']}")
    if counts["failed"]:
        for line in client.results(batch["id"]):
            if line["status"] == "failed":
                retry = " (retryable)" if line.get("retryable") else ""
                console.print(f"  [red]{line['custom_id']}[/] {line.get('error_code')}{retry}: {line.get('error')}")
    console.print(f"{seconds:.1f} s, {counts['succeeded'] / seconds if seconds else 0:.2f} images/s")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


@app.command()
def up(port: Port = 8000, gpus: str = "all", data_dir: Path | None = None) -> None:
    """Run the embedded stack (SQLite, Redis, SeaweedFS S3, API, workers) until Ctrl-C."""
    ensure_port_free(port)
    from step1x.stack import EmbeddedStack, ensure_default_weights

    data_dir = data_dir or get_settings().data_dir
    ensure_default_weights(Settings(data_dir=data_dir), console)
    stack = EmbeddedStack(data_dir, api_port=port, gpus=gpus)
    with console.status("starting Redis, S3, the API and the workers..."):
        stack.start()
    console.print(f"[green]Step1X Batch is up[/] at {stack.api_url} (OpenAPI: {stack.api_url}/docs)")
    console.print(f"development API key: [bold]{stack.api_key}[/] (also in {stack.data_dir / 'dev-key'}; "
                  f"`step1x keys dev` prints it)")
    console.print(f"logs: {stack.logs}   Ctrl-C stops everything")
    # SIGINT may be ignored when started in the background; both signals stop the stack cleanly.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        while stack.alive():
            time.sleep(0.5)
        console.print("[red]a process of the stack exited; see the logs[/]")
    except KeyboardInterrupt:
        pass
    finally:
        with console.status("stopping..."):
            stack.stop()


@app.command()
def worker(gpus: Annotated[str, typer.Option(help="'all', 'cpu', or GPU indices like 0,1")] = "all",
           beat: bool = False, loglevel: str = "INFO",
           models: Annotated[str | None, typer.Option(help="model profiles served, like tiny-sd,lanczos-x4 "
                                                          "(default: every configured profile)")] = None,
           calibrate: Annotated[bool, typer.Option(help="first measure each model's best micro-batch on each "
                                                        "device; the planner uses it")] = False) -> None:
    """One Celery worker process per GPU (CUDA_VISIBLE_DEVICES-pinned); one CPU worker without GPUs.
    Each takes micro-batches only from the queues of the models it serves."""
    from workers import launcher

    try:
        code = launcher.run(gpus, loglevel=loglevel, beat=beat, models_spec=models, calibrate_first=calibrate)
    except ValueError as exc:  # --gpus or --models naming what is not there: say so, no traceback
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema."""
    from core.db import redact, upgrade

    upgrade(get_settings().database_url)
    console.print(f"database at {redact(get_settings().database_url)} is up to date")


@keys_app.command("create")
def keys_create(tenant: str, operator: Annotated[bool, typer.Option(
        "--operator", help="an operator key: sees every tenant on the dashboard, may pause queues and drain "
                           "workers")] = False) -> None:
    """Print a new API key for TENANT (created if new). Only its hash is stored: keep it."""
    from core.db import session_scope, upgrade
    from core.keys import create_key

    settings = get_settings()
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        key = create_key(session, tenant, operator=operator)
    typer.echo(key)


@keys_app.command("dev")
def keys_dev() -> None:
    """Print the development key of the local stack (`step1x up` writes it to the data folder)."""
    path = dev_key_path()
    if not path.is_file():
        raise Step1XError(f"no development key at {path}: start the stack with `step1x up` first")
    typer.echo(path.read_text().strip())


@app.command()
def submit(manifest: Path, wait: bool = False,
           completion_window: Annotated[str | None, typer.Option(help="e.g. 24h: unfinished jobs then expire")] = None,
           output_ttl: Annotated[str | None, typer.Option(help="e.g. 7d: outputs are deleted this long after")] = None,
           quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the batch id")] = False,
           api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Submit a JSONL manifest (local image paths are uploaded); with --wait, show progress, then a summary."""
    with Client(api_url, api_key) as client:
        started = time.monotonic()
        batch = client.submit_manifest(manifest, completion_window=completion_window, output_ttl=output_ttl)
        if quiet:
            if wait:
                client.wait_batch(batch["id"])
            typer.echo(batch["id"])
            return
        console.print(f"batch [bold]{batch['id']}[/]: {batch['total']} items queued")
        if wait:
            batch = wait_with_progress(client, batch)
            print_summary(client, batch, time.monotonic() - started)


@app.command()
def status(batch_id: str, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """A batch's status and counts."""
    with Client(api_url, api_key) as client:
        console.print_json(json.dumps(client.get_batch(batch_id)))


@app.command()
def results(batch_id: str, out: Path = Path("results"), api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Download every output of a batch into OUT, named by custom_id, with its format's extension."""
    with Client(api_url, api_key) as client:
        paths = client.download_results(batch_id, out)
    console.print(f"{len(paths)} images in {out}")


@app.command()
def demo(out: Path = Path("demo-output"), port: Port = 8000, data_dir: Path | None = None) -> None:
    """Start the embedded stack, run a 48-item demo catalog through it, download, summarise, stop."""
    ensure_port_free(port)
    from step1x.demo import run_demo

    ok = run_demo(out, data_dir or get_settings().data_dir, port, console)
    raise typer.Exit(0 if ok else 1)


@models_app.command("build-tiny")
def build_tiny(directory: Path) -> None:
    """Build the tiny offline pipelines (random weights: they draw noise) into DIRECTORY."""
    from models.tiny import build_tiny as build

    console.print(f"tiny pipelines in {build(directory)}")


@models_app.command("pull")
def pull(name: str, directory: Path | None = None) -> None:
    """Fetch and convert the weights of an upscaler profile (realesrgan-x4, waifu2x-x4)."""
    from models.pull import pull as fetch

    path = fetch(name, directory or get_settings().model_root, console=console)
    console.print(f"{name}: {path}")


@app.command("eval")
def evaluate(out: Path = Path("eval-output/eval.json"), photos: int | None = None) -> None:
    """Measure fill and 4x upscaling quality on sample photos shipped in scikit-image / scikit-learn."""
    from models.evaluate import print_report, run_eval
    from models.pull import PULLABLE, pull

    root = get_settings().model_root
    for name in PULLABLE:  # every upscaler is measured; fetching is a no-op once they are here
        pull(name, root, console=console)
    print_report(run_eval(root, out, photos, console=console), console=console)
    console.print(f"written to {out}")


@app.command("measure-upscalers")
def measure_upscalers(out: Path = Path("eval-output/upscalers.json"), size: int = 512, repeats: int = 3,
                      device: Annotated[str | None, typer.Option(help="cpu, cuda (default: each profile's)")] = None
                      ) -> None:
    """Seconds per output megapixel of every upscaler: what picks the default upscaler per device."""
    from models.pull import PULLABLE, pull
    from models.upscale_cost import measure, print_report

    settings = get_settings()
    for name in PULLABLE:  # fetching is a no-op once they are here
        pull(name, settings.model_root, console=console)
    names = sorted(n for n, p in settings.models.items() if p.task == "upscale")
    print_report(measure(settings, names, size, repeats, device), console, out)


def main() -> None:
    logging.basicConfig(level=os.environ.get("STEP1X_LOG_LEVEL", "WARNING"))
    try:
        app()
    except (APIError, Step1XError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None
