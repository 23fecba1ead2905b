#!/bin/bash
# Install Debian's Slurm and munge for the tests marked `slurm` (about 8 s; nothing when present).
# The pytest fixture in tests/test_slurm_cluster.py starts the one-node cluster and stops it again.
#   bash .ci/slurm_setup.sh && python -m pytest -m slurm tests/test_slurm_cluster.py
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" tests/slurm_cluster.py install
