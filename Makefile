# The README's commands. Each target sets up what it needs: a venv with the pinned CPU torch (GPU
# users install their own torch build first and set TORCH=), the project, and redis-server /
# postgresql from apt where missing.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup system demo test lint bench eval up clean screenshots

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

demo: setup
	$(VENV)/bin/step1x demo

up: setup
	$(VENV)/bin/step1x up

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench

eval: setup
	$(VENV)/bin/step1x eval

# The README's dashboard screenshots (docs/*.png), taken from a demo run on the embedded stack.
screenshots: setup
	$(PY) -m step1x.screenshots docs

clean:
	rm -rf .step1x demo-output eval-output .pytest_cache .mypy_cache .ruff_cache
