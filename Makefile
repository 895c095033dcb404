# atx: the two commands are `make demo` (default job) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch pins: on our machines these wheels come from local files; change for other platforms.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.atx-installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install fashion-mnist demo test test-fast lint bench bench-data clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install atx with its dev tools

# Debian's dataset-fashion-mnist, installed when missing: as root directly, else through sudo.
fashion-mnist:
	@test -d $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "Fashion-MNIST is not installed and this user cannot install packages: run 'sudo apt-get install dataset-fashion-mnist', then run make again"; exit 2; fi; \
	  echo "installing Debian's dataset-fashion-mnist (Fashion-MNIST, no download from elsewhere)"; \
	  $$SUDO apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	  { echo "installing dataset-fashion-mnist failed: run 'sudo apt-get install dataset-fashion-mnist', then run make again"; exit 2; }; }

demo: install fashion-mnist  ## teacher, then plain / AT / AT+KD students over 3 seeds on Fashion-MNIST; table + figures
	$(PY) scripts/demo.py

# one pytest-xdist worker per core, 8 at most (tests/conftest.py gives each one compute thread);
# the slowest tests start and end processes, which a second worker overlaps with compute
test: install fashion-mnist  ## the whole test suite (CPU, offline)
	$(PY) -m pytest -n auto --maxprocesses 8 --dist worksteal

# the edit loop: the paper's math, configs and presets, errors, the builder and its layers
FAST := tests/test_attention.py tests/test_losses.py tests/test_gradient_attention.py \
        tests/test_models.py tests/test_optim.py tests/test_report.py tests/test_presets.py \
        tests/test_config_errors.py tests/test_errors.py tests/test_architecture.py \
        tests/test_golden.py tests/test_new_term.py
test-fast: install fashion-mnist  ## math, configs, errors, builder (under 2 min on 2 cores)
	$(PY) -m pytest $(FAST)

lint: install
	$(VENV)/bin/ruff check src tests scripts

bench: install  ## step throughput and memory: atx vs raw loop vs authors' step, speed options (docs/benchmarks.md)
	$(PY) scripts/bench.py

bench-data: install  ## data pipeline: images/s of the per-image PIL loader vs atx (docs/benchmarks.md)
	$(PY) scripts/bench_data.py
