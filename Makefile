# Two commands for a new machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8888
# The demo's Jupyter token: a fresh one per run unless EQX_EXPLORER_TOKEN is set. A dedicated
# name, as it is printed in the URL: a generic TOKEN in the environment is often another secret.
ifndef EQX_EXPLORER_TOKEN
EQX_EXPLORER_TOKEN := $(shell $(PYTHON) -c "import secrets; print(secrets.token_hex(16))")
endif
# Jupyter refuses to run as root without this flag (containers, CI machines).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: demo test lint format bench chromium clean

# The virtual env is rebuilt only when pyproject.toml or Binder's pins change. It installs the
# versions Binder pins (binder/requirements.txt less its `.` line, as pip constraints), so the
# suite tests what Binder installs, not whatever PyPI released since the pins were written.
$(STAMP): pyproject.toml binder/requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	grep -v '^\.$$' binder/requirements.txt > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (eqx_explorer)" >/dev/null
	@touch $(STAMP)

chromium:
	@sh scripts/ensure_chromium.sh

demo: $(STAMP)
	@echo "Starting JupyterLab. Open this URL (the tour notebook):"
	@echo "    http://$(HOST):$(PORT)/lab/tree/notebooks/00_tour.ipynb?token=$(EQX_EXPLORER_TOKEN)"
	$(BIN)/jupyter lab --no-browser --ip=$(HOST) --port=$(PORT) $(ROOT_FLAG) \
		--IdentityProvider.token=$(EQX_EXPLORER_TOKEN) --ServerApp.root_dir=$(CURDIR) \
		notebooks/00_tour.ipynb

# Bytecode is written even where the machine sets PYTHONDONTWRITEBYTECODE (this one does): the
# run starts about 20 Python processes (workers, kernels, the Binder venv's notebooks), and each
# would otherwise compile the same sources again (0.5 s for the package, 2-3 s for JAX in the
# Binder venv, which uv installs without compiling, where pip, as Binder runs it, compiles).
test: $(STAMP) chromium lint
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n auto --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache .ruff_cache .hypothesis
