# The two commands of the README: `make demo` (the whole pipeline on generated data) and `make test`.
# Both create or update the virtual environment in .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# TORCH_INDEX=https://download.pytorch.org/whl/cpu: take torch and torchvision from that index first (PyTorch's
# CPU-only build, without the CUDA libraries of the default one); the pinned versions stay those of constraints.txt.
TORCH_INDEX ?=

.PHONY: demo test test-slow venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --index-url $(TORCH_INDEX) torch torchvision)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cachedseg demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
