# atx: the two commands are `make demo` (default job) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch pins: on our machines these wheels come from local files; change for other platforms.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.atx-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install demo test lint bench bench-data clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install atx with its dev tools

demo: install  ## teacher, student, student+AT on Fashion-MNIST; table + attention figure
	@test -d $(FMNIST) || { echo "Fashion-MNIST not found at $(FMNIST): run 'sudo apt-get install dataset-fashion-mnist'"; exit 2; }
	$(PY) scripts/demo.py

test: install  ## the whole test suite (CPU, offline, < 10 min on 2 cores)
	@test -d $(FMNIST) || { echo "Fashion-MNIST not found at $(FMNIST): run 'sudo apt-get install dataset-fashion-mnist'"; exit 2; }
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests scripts

bench: install  ## step throughput and memory: atx vs raw loop vs authors' step, speed options (docs/benchmarks.md)
	$(PY) scripts/bench.py

bench-data: install  ## data pipeline: images/s of the per-image PIL loader vs atx (docs/benchmarks.md)
	$(PY) scripts/bench_data.py
