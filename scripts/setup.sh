#!/usr/bin/env bash
# Set up a local virtual environment in .venv with deltafm and everything its tests and CLI need.
# Installs the CPU wheel torch==2.13.0 first (a loose `torch` would pull a multi-GB CUDA build);
# GPU users: install your own torch build first, then `pip install -e ".[train,dev,vae,repa,text]"`.
# Where apt is available (root), also installs Debian's Fashion-MNIST package (the embedded data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || echo "note: torch==2.13.0 not installable here; keeping the torch that pip resolves"
.venv/bin/python -m pip install -q -e ".[train,dev,vae,repa,text]"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
            || echo "note: could not install dataset-fashion-mnist; put the four IDX files in a folder and pass data.root=DIR"
    else
        echo "note: Fashion-MNIST not found; put the four IDX files in a folder and pass data.root=DIR"
    fi
fi
echo "deltafm set up in .venv"
