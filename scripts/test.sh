#!/usr/bin/env bash
# Fresh machine -> the whole test suite: set up, then pytest. Extra arguments go to pytest.
# Tests that need a Slurm cluster start a local one themselves (tests/slurm_cluster.py, root + apt).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled} MPLBACKEND=Agg
exec python -m pytest -q --durations=15 "$@"
