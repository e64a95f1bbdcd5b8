# The README's commands. Each target sets up what it needs: a venv with the pinned CPU torch (GPU
# users install their own torch build first and set TORCH=), the project, and redis-server /
# postgresql from apt where missing.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# The API's port for `make demo` / `make up` (make demo PORT=8017).
PORT ?= 8000

.PHONY: setup system demo test lint bench bench-gpu eval up clean port-free measure-upscalers screenshots

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed system

# chromium: the browser the dashboard tests and `make screenshots` drive (never a downloaded one).
system:
	@if ! command -v redis-server >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
			|| ! command -v chromium >/dev/null; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server postgresql chromium >/dev/null; \
	fi

# Checked before setup, so a taken port fails in a second rather than after minutes of installing.
port-free:
	@python3 -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
	s.bind(('127.0.0.1', $(PORT)))" 2>/dev/null || { echo "error: port $(PORT) on 127.0.0.1 is already in use. \
	Choose another port: make $(MAKECMDGOALS) PORT=8017" >&2; exit 2; }

demo: port-free setup
	$(VENV)/bin/step1x demo --port $(PORT)

up: port-free setup
	$(VENV)/bin/step1x up --port $(PORT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench $(if $(QUICK),--quick)

# Real-size SD 1.5 on a CUDA GPU: install your CUDA torch build and run `make bench-gpu TORCH=`.
bench-gpu: $(VENV)/.installed
	$(PY) -m bench.gpu

eval: setup
	$(VENV)/bin/step1x eval

# The README's dashboard screenshots (docs/*.png), taken from a demo run on the embedded stack.
screenshots: setup
	$(PY) -m step1x.screenshots docs

measure-upscalers: setup
	$(VENV)/bin/step1x measure-upscalers

clean:
	rm -rf .step1x demo-output eval-output .pytest_cache .mypy_cache .ruff_cache
