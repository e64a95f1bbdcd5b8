# One image for the API, Celery beat and the GPU workers (docker-compose.yml).
#
# CUDA: `pip install .` takes torch from PyPI, whose Linux x86_64 wheels are CUDA builds that carry
# their own CUDA runtime; the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.
# To choose the build, either pass an index (installed first, so `pip install .` keeps it):
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124   # CUDA 12.4
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu     # CPU only, smaller
# or start from an image that already holds the torch you want:
#   docker compose build --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install torch --index-url "$TORCH_INDEX_URL"; fi

COPY pyproject.toml README.md /src/
COPY step1x /src/step1x
COPY core /src/core
COPY models /src/models
COPY workers /src/workers
COPY api /src/api
COPY migrations /src/migrations
RUN pip install /src && rm -rf /src

# Not root: nothing here needs it. /app is the working directory so celery beat can write its schedule.
RUN useradd --create-home --uid 10001 step1x \
    && mkdir -p /app /data /models \
    && chown step1x /app /data
USER step1x
WORKDIR /app
ENV STEP1X_DATA_DIR=/data STEP1X_MODELS_DIR=/models

EXPOSE 8000
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
