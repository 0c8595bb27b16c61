# Two commands for a new machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8888

.PHONY: demo test lint format bench chromium clean

# The virtual env is rebuilt only when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (eqx_explorer)" >/dev/null
	@touch $(STAMP)

chromium:
	@sh scripts/ensure_chromium.sh

demo: $(STAMP)
	@echo "Starting JupyterLab; open the URL printed below (the tour notebook opens first)."
	$(BIN)/jupyter lab --no-browser --ip=$(HOST) --port=$(PORT) \
		--ServerApp.root_dir=$(CURDIR) notebooks/00_tour.ipynb

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache .ruff_cache .hypothesis
