# `make demo`: the main job on the embedded default. `make test`: the test suite.
# Both create/refresh the local virtual environment first (idempotent; a second run skips the install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=
# Where pip finds torch's CPU build. This machine's pip is configured with a folder holding it; on others PyPI's
# Linux torch is the CUDA build (gigabytes): `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=

.PHONY: install demo test clean-runs

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A torch already in the environment (a CUDA build installed as README.md says) is kept; otherwise torch is
	# pinned in the same command, as unpinned pip resolves the newest CUDA build. Never torchvision.
	if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PY) -m pip install -q -e ".[dev]"; \
	else \
		$(PY) -m pip install -q -c constraints.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
			"torch==2.13.0" -e ".[dev]"; \
	fi
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
