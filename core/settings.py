"""One validated settings object, read through `get_settings()`.

Every value comes from the environment with the prefix `STEP1X_` (nested values with `__`, for
example `STEP1X_MODELS='{"sd15": {...}}'`), or from a `.env` file. Tests override it by setting
the environment and calling `get_settings.cache_clear()`.
"""

from __future__ import annotations

import os
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError
from core.formats import PNG_LEVEL

Task = Literal["generate", "inpaint", "upscale"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]

PLACEHOLDER_SECRETS = {"changeme", "step1x-dev-secret", "step1x-dev-key", ""}


class ModelProfile(BaseModel):
    """One model a worker can load: what it does, which engine runs it, where its weights are."""

    task: Task
    # "diffusers" (text-to-image / inpaint), "controlnet" (structure inpaint), "classical" (OpenCV fill),
    # "esrgan" (RRDBNet .pth/.safetensors), "waifu2x" (converted ncnn weights), "lanczos" (resampling).
    engine: Literal["diffusers", "controlnet", "classical", "esrgan", "waifu2x", "lanczos"]
    # Local directory (diffusers layout) or weight file. Never a hub id: nothing is downloaded at run time.
    weights: str | None = None
    # Extra weights: the ControlNet directory for engine="controlnet".
    controlnet: str | None = None
    precision: Precision = "auto"
    device: str = "auto"
    # Pixels one forward pass may hold: width x height x images drawn (diffusion), output pixels
    # (upscalers, which tile to fit it). Micro-batches are cut to fit it; raise it on big GPUs.
    pixel_budget: int = 8 * 512 * 512
    # Most jobs in one micro-batch, however few pixels they add. A micro-batch is what a worker
    # claims, stores and finishes as one: cut by pixels alone, 5,000 small upscales became one
    # micro-batch whose outputs all appeared at its end, and an interactive job's store waited behind
    # all of its uploads (6.1 s to finish instead of 0.72 s: python -m bench.jobcap).
    max_jobs: int = Field(256, ge=1)
    # Edge of the square the model works at natively (inpaint crops are resized to it).
    native_size: int = 512
    # Largest edge a request may ask for (generate) or bring (inpaint/upscale input).
    max_size: int = 4096
    attention_slicing: bool = False
    vae_tiling: bool = False
    # Diffusion engines: run the UNet, ControlNet and VAE decoder as TorchScript traces
    # (models.tracing), for small models on a CPU: the tiny SD 1.3x faster, SD 1.5's UNet 1.00-1.05x
    # (python -m bench.tracing). Unmeasured on a GPU.
    trace: bool = False
    # Marks the offline defaults, whose random weights draw noise: logged loudly when loaded.
    tiny: bool = False

    @property
    def seeded(self) -> bool:
        """Whether its output depends on the seed: diffusion does; upscalers and the classical filler
        are deterministic."""
        return self.engine in ("diffusers", "controlnet")


def _default_profiles(models_dir: Path) -> dict[str, ModelProfile]:
    tiny = models_dir / "tiny"
    return {
        "tiny-sd": ModelProfile(
            task="generate", engine="diffusers", weights=str(tiny / "text2img"),
            pixel_budget=16 * 64 * 64, native_size=64, max_size=1024, tiny=True,
        ),
        "tiny-sd-inpaint": ModelProfile(
            task="inpaint", engine="diffusers", weights=str(tiny / "inpaint"),
            pixel_budget=16 * 64 * 64, native_size=64, tiny=True,
        ),
        "tiny-sd-controlnet": ModelProfile(
            task="inpaint", engine="controlnet", weights=str(tiny / "inpaint"),
            controlnet=str(tiny / "controlnet"), pixel_budget=16 * 64 * 64, native_size=64, tiny=True,
        ),
        "classical-fill": ModelProfile(task="inpaint", engine="classical", pixel_budget=32 * 512 * 512),
        "realesrgan-x4": ModelProfile(
            task="upscale", engine="esrgan", weights=str(models_dir / "realesrgan-x4plus.safetensors"),
            pixel_budget=4 * 256 * 256,
        ),
        "waifu2x-x4": ModelProfile(
            task="upscale", engine="waifu2x", weights=str(models_dir / "waifu2x-photo.safetensors"),
            pixel_budget=4 * 256 * 256,
        ),
        "lanczos-x4": ModelProfile(task="upscale", engine="lanczos", pixel_budget=64 * 512 * 512),
    }


# Which profile serves a job that names none, per task ("inpaint.<mode>" for inpainting).
DEFAULT_MODELS = {
    "generate": "tiny-sd",
    "inpaint.fill": "classical-fill",
    "inpaint.text": "tiny-sd-inpaint",
    "inpaint.structure": "tiny-sd-controlnet",
    "upscale": "realesrgan-x4",
}
# Where the workers have no GPU: Real-ESRGAN measured ~20x the CPU time of waifu2x per output
# megapixel (`step1x measure-upscalers`, README), and waifu2x scores the higher PSNR.
CPU_DEFAULT_MODELS = {"upscale": "waifu2x-x4"}


@cache
def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU to its processes (driver device nodes; no torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def default_data_dir() -> Path:
    """A stable per-user folder (~/.local/share/step1x on Linux), whatever the working directory."""
    return Path(platformdirs.user_data_dir("step1x", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STEP1X_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    environment: Literal["development", "production"] = "development"
    # Root of local state for the embedded stack: SQLite file, logs, model weights, S3 data, dev key.
    data_dir: Path = Field(default_factory=default_data_dir)

    database_url: str = ""  # default: SQLite in data_dir
    redis_url: str = "redis://127.0.0.1:6379/0"

    s3_endpoint_url: str | None = "http://127.0.0.1:8333"
    # Address clients use for presigned URLs, when it differs from the one workers use.
    s3_public_endpoint_url: str | None = None
    s3_bucket: str = "step1x"
    s3_region: str = "us-east-1"
    s3_access_key: str = "step1x"
    s3_secret_key: str = "step1x-dev-secret"
    presign_seconds: int = 3600
    # PEM file of the CAs to trust for an https S3 endpoint (one behind a private CA), for every S3
    # client of the service; unset (or empty): AWS_CA_BUNDLE, else the system's CA store.
    s3_ca_bundle: str | None = None
    # Parallel uploads per worker; the S3 connection pool is sized to match.
    upload_concurrency: int = 8
    # zlib's level for PNG outputs: 1 encodes fastest, 9 smallest (`python -m bench.encode`).
    png_compress_level: int = Field(PNG_LEVEL, ge=0, le=9)
    # Micro-batches a worker may hold handed over and not yet stored: in the engine process, or
    # being encoded and uploaded; past it the next hand-over waits, its forward pass already sent
    # (back-pressure, memory bounded).
    pipeline_depth: int = 2
    # While the engine runs a micro-batch, read and decode the inputs of the one the worker will
    # likely take next (`workers.lookahead`): at most one micro-batch of inputs ahead. Unset: on
    # unless S3 is on this machine's loopback.
    prefetch_inputs: bool | None = None
    # Run the worker's engines in a process of their own (`workers.engine_host`): the forward pass
    # shares no interpreter lock with the threads that store outputs, and the task thread claims
    # and prepares the next micro-batch while it runs. Off: in the task thread.
    engine_process: bool = True
    # torch's CPU threads in each process that runs engines (`models.device.limit_cpu_threads`).
    # Unset: as OMP_NUM_THREADS says, else one fewer than the cores the process may use (affinity,
    # a container's CPU quota), so the worker's storing threads and the services beside it do not
    # take a core a forward pass waits on at every step.
    cpu_threads: int | None = Field(None, ge=1)
    # Leave what the worker's processes import at start (torch, SQLAlchemy, Celery) out of the
    # garbage collector's full collections (`core.heap`); models load later and stay collectable.
    # Off: Python's default, for `python -m bench.collector` to compare.
    freeze_heap: bool = True
    # boto3's own tries per S3 call before the micro-batch counts as interrupted and is retried whole.
    s3_max_attempts: int = 5
    # Defaults of a batch's `completion_window` (jobs not finished by then end expired) and
    # `output_ttl` (outputs are deleted this long after the batch finishes), in seconds.
    completion_window: int = Field(24 * 3600, ge=60, le=30 * 24 * 3600)
    output_ttl: int = Field(7 * 24 * 3600, ge=3600, le=30 * 24 * 3600)

    # Redis re-delivers a task unacknowledged for this long: keep it far above the longest micro-batch.
    visibility_timeout: int = 3600
    # A claimed job belongs to its worker until this many seconds pass; the reconciler re-queues it after.
    lease_seconds: int = 900
    max_attempts: int = 3
    # A queued job with no progress after this long is dispatched again (its message may be lost).
    redispatch_after: int = 600
    # A job stored this long ago and never stamped as sent lost its dispatch (the API died at commit).
    never_sent_after: float = 60.0
    # The control process runs the reconciler this often; /readyz reports it stale past 3 intervals.
    reconcile_interval: float = 10.0
    # Infrastructure trouble (S3, database, broker) never uses up a job's attempts: its micro-batch
    # is retried with backoff (doubling from the base up to the cap) for up to the outage budget,
    # then its jobs fail with error_code "outage".
    outage_budget: float = 1800.0
    outage_retry_base: float = 2.0
    outage_retry_max: float = 60.0
    # Each worker records itself in the workers table this often; one silent for worker_dead_after
    # is dead and the reconciler takes its running jobs back.
    heartbeat_interval: float = 5.0
    worker_dead_after: float = 30.0
    # How often a running micro-batch records progress and looks for a cancel (seconds).
    progress_interval: float = 1.0

    # A single interactive job waits at most this long for others to share its micro-batch (0: never).
    coalesce_ms: int = 20
    max_batch_items: int = 100_000
    max_upload_bytes: int = 40 * 1024 * 1024
    max_manifest_bytes: int = 200 * 1024 * 1024
    max_image_side: int = 8192
    # Backpressure: a submission that would take a tenant past this many queued jobs is refused
    # whole with 429 and Retry-After (0: no cap). Clients wait and retry.
    max_queued_per_tenant: int = 1_000_000
    backpressure_retry_after: int = 30
    # Any other request body (JSON). A 100,000-item catalog in JSON is ~30 MB.
    max_request_bytes: int = 64 * 1024 * 1024
    # Free-form metadata (a batch's, `?metadata=` of a manifest), serialized as JSON.
    max_metadata_bytes: int = 16 * 1024
    # Nesting of any JSON a client sends: deeper documents are refused before they reach a
    # recursive parser or serializer.
    max_json_depth: int = 32
    # Failed API-key checks per client address and window before answering 429 (counted in Redis,
    # so every API process sees the same count). A valid key is never held back.
    auth_failure_limit: int = 20
    auth_failure_window: int = 60
    # Retry-After (seconds) sent with a 503 while the database, Redis or S3 is down.
    unavailable_retry_after: int = 5
    # Refuse at submit a job whose model's weights are not on disk. Turn off when the API runs on
    # a host without the workers' model directory.
    check_weights_at_submit: bool = True

    # Outbound HTTP (webhooks, URL inputs). Comma-separated CIDRs allowed despite the non-public
    # address rules (and over plain http in production); nothing is allowed by default.
    outbound_allow: str = ""
    # Base URL clients reach the API at, for links in webhook payloads (the results URL).
    public_url: str = "http://127.0.0.1:8000"
    webhook_timeout: float = 15.0
    # Multiplies every retry delay of deliveries and fetches, and the 5-day disable rule: tests shrink them.
    outbound_retry_scale: float = 1.0
    # How often the control process looks for deliveries and fetches that are due (lost messages, retries).
    outbound_due_interval: float = 5.0
    # A URL input must finish downloading within this many seconds.
    fetch_timeout: float = 30.0
    fetch_attempts: int = 5

    models_dir: Path | None = None  # default: data_dir / "models"
    models: dict[str, ModelProfile] = Field(default_factory=dict)
    # The workers' device kind, which picks the per-device defaults below; "auto" looks at this
    # machine. Set it where the API runs apart from its GPU workers.
    compute: Literal["auto", "cpu", "cuda"] = "auto"
    # Profile per task for jobs that name none; entries given here override the per-device defaults.
    default_models: dict[str, str] = Field(default_factory=dict)
    # Profiles loaded at once in one worker; the least recently used is evicted past this.
    pipeline_cache_size: int = 4
    prompt_cache_size: int = 1024

    # Signs dashboard session cookies. Empty in development: a random secret per API process (sessions
    # end when it restarts); production refuses to start without a real one.
    session_secret: str = ""
    # Each worker process serves its Prometheus metrics (micro-batch sizes, stage durations) on this
    # port plus its GPU index; 0 turns it off.
    worker_metrics_port: int = 0

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'step1x.db').resolve()}"
        if self.models_dir is None:
            self.models_dir = self.data_dir / "models"
        # User profiles extend and override the offline defaults.
        self.models = {**_default_profiles(self.models_dir), **self.models}
        on_cpu = self.compute == "cpu" or (self.compute == "auto" and not gpu_visible())
        self.default_models = {**DEFAULT_MODELS, **(CPU_DEFAULT_MODELS if on_cpu else {}), **self.default_models}
        for key, name in self.default_models.items():
            if name not in self.models:
                raise ConfigError(f"STEP1X_DEFAULT_MODELS[{key!r}] names unknown model profile {name!r}")
        # Worked out once, so the three S3 clients (urllib3, libcurl, boto3) trust the same CAs.
        self.s3_ca_bundle = self.s3_ca_bundle or os.environ.get("AWS_CA_BUNDLE") or None
        if self.s3_ca_bundle and not Path(self.s3_ca_bundle).is_file():
            raise ConfigError(f"STEP1X_S3_CA_BUNDLE (or AWS_CA_BUNDLE): no file at {self.s3_ca_bundle}")
        if self.environment == "production" and self.s3_secret_key in PLACEHOLDER_SECRETS:
            raise ConfigError("STEP1X_S3_SECRET_KEY is a development placeholder: set a real secret")
        if self.environment == "production" and (self.session_secret in PLACEHOLDER_SECRETS
                                                 or len(self.session_secret) < 32):
            raise ConfigError("STEP1X_SESSION_SECRET must be a random string of 32+ characters in production")
        return self

    @property
    def model_root(self) -> Path:
        assert self.models_dir is not None
        return self.models_dir


@lru_cache
def get_settings() -> Settings:
    return Settings()
