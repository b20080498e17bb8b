# `make demo` and `make test` set everything up themselves in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench lint format clean totalseg

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# DeepSpeed builds against the torch installed above (without build isolation pip would
	# fetch another torch to build it); the multi-process tests run its ZeRO engines on CPU.
	$(PY) -m pip install --quiet setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation 'deepspeed>=0.15,<0.20'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/radgrounder demo --out demo_output

test: $(STAMP)
	$(VENV)/bin/ruff check radgrounder tests benchmarks
	$(PY) -m pytest

# TotalSegmentator for `labels segment`, keeping the torch installed above: its dependencies
# (nnunetv2 -> timm -> torchvision) would otherwise replace it by another (CUDA) build.
totalseg: $(STAMP)
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -e '.[totalseg]' -c $(VENV)/torch-constraint.txt

# The CPU benchmarks (about 12 minutes on 2 cores): docs/benchmarks.md and README's summary.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check radgrounder tests benchmarks
	$(VENV)/bin/ruff format --check radgrounder tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format radgrounder tests benchmarks

clean:
	rm -rf $(VENV) demo_output .pytest_cache
