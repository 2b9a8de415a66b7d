# Two commands on a fresh machine: `make run` serves the bundled model, `make test` runs the tests.
# Both create the virtual environment in .venv on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned `torch` may pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: run test container-check system-deps bench-train clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/charrnn serve --host 127.0.0.1 --port 8000

test: $(BIN)/.installed system-deps
	$(BIN)/python -m pytest -q

# The Dockerfile and docker-compose.yml built and run for real (podman; needs root; about 6 minutes cold).
container-check: $(BIN)/.installed
	tests/container/run.sh

# Debian packages the tests need (chromium, redis-server, nginx, docker-compose); installs only what is missing.
system-deps:
	tools/system-deps.sh

bench-train: $(BIN)/.installed
	$(BIN)/python bench/train_speed.py

clean:
	rm -rf $(VENV) .pytest_cache runs
