#!/usr/bin/env bash
# Create .venv (if needed) and install launcher with its test and DeepSpeed extras.
# torch is installed first and pinned (constraints.txt): an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored: it is neither" || true
fi
pip install -q -c scripts/constraints.txt -e ".[dev,deepspeed,tensorboard]" 2>&1 | grep -v "is ignored: it is neither" || true
python -c "import launcher, torch, accelerate; print(f'launcher {launcher.__version__}, torch {torch.__version__}, accelerate {accelerate.__version__}')"
