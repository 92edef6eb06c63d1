# Two commands a fresh machine needs: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install serve e2e clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lensflow demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Two test processes on two cores, one intra-op thread each: torch's default of a thread per core
# made the two oversubscribe each other (nine model-heavy test files: 116 s against 90 s).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -ra --durations=15 -n 2 --dist loadfile

serve: $(STAMP)
	$(BIN)/lensflow serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

e2e: $(STAMP)
	$(BIN)/pytest -q -m e2e
