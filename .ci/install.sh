#!/usr/bin/env bash
# Installs crystalfm and everything its tests need into ./.venv, from scratch.
# torch is pinned and installed first: any open range pulls a multi-GB CUDA build.
# `--demo`: only what `crystalfm demo` needs (skips the torch-scatter build and the SLURM packages).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_ONLY=0; [ "${1:-}" = "--demo" ] && DEMO_ONLY=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip wheel setuptools
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
[ "$DEMO_ONLY" = 1 ] && exit 0
# torch-scatter is the reference path of the neighbour kernels; it builds from source
# (about 6 minutes on 2 cores, cached by pip afterwards) and must see the installed torch.
python -c 'import torch_scatter' 2>/dev/null || \
  python -m pip install -q --no-build-isolation torch-scatter==2.1.2
# A real local SLURM for cluster/launch.sh's tests (skipped when installed, or when not root).
command -v slurmctld >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } || true
