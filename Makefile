# `make demo`: the main job on the embedded default. `make test`: the test suite.
# Both create/refresh the local virtual environment first (idempotent; a second run skips the install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo test clean-runs

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same command: unpinned, pip resolves a CUDA build (gigabytes). Never torchvision.
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0" -e ".[dev]"
	@if $(PY) -c "import torchvision" 2>/dev/null; then echo "torchvision is installed in $(VENV): it breaks transformers' LLaVA import with this torch; uninstall it"; exit 1; fi
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	PYTHONUNBUFFERED=1 $(PY) scripts/demo.py --run-dir $(RUN_DIR)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

clean-runs:
	rm -rf runs/
