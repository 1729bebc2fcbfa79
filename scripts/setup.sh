#!/usr/bin/env bash
# Installs everything ectune needs on a fresh Debian/Ubuntu machine: Fashion-MNIST (Debian package), the CPU
# PyTorch wheel, and ectune with its test extra. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${ECTUNE_FASHION_MNIST:-}" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

PY=${PYTHON:-python3}
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build here.
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[test]"
$PY -c "import ectune, torch; print(f'ectune {ectune.__version__} with torch {torch.__version__} ready')"
