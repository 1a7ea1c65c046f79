#!/usr/bin/env bash
# Install looplm on a fresh machine: the pinned CPU torch first (an unpinned torch would pull a
# multi-GB CUDA build), then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[dev,lm-eval]'  # lm-eval: the adapter's tests (it keeps torch as is)
python -m looplm.kernels  # compile the C++ CPU kernels now (one to three minutes), not on first use
