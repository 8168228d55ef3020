# Two entry points on a fresh machine: `make demo` (whole pipeline on Fashion-MNIST) and `make test`.
# Each creates .venv and installs what it needs; later runs reuse it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export OMP_WAIT_POLICY := PASSIVE
export MLFLOW_ALLOW_FILE_STORE := true
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test bench fmnist clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST without internet from Debian's package when apt is there; otherwise torchvision downloads it.
fmnist:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "dataset-fashion-mnist not installable here; torchvision will download Fashion-MNIST"; \
	fi

demo: $(STAMP) fmnist
	$(VENV)/bin/sre2l pipeline configs/demo.yaml

# One process: `pytest -n 2 --dist loadfile` (pytest-xdist) takes ~21 min instead of ~25 here, but two of its
# three full runs had a load-dependent failure (not explained yet), so CI stays serial.
test: $(STAMP) fmnist
	$(VENV)/bin/pytest -q

bench: $(STAMP) fmnist
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs mlflow.db mlartifacts
