#!/usr/bin/env bash
# Fresh machine -> a trained MNIST-1D CNN: set up, train recipes/mnist1d.yaml on the CPU, print the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=${1:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
python -m launcher.train --recipe recipes/mnist1d.yaml --output_dir "$out"
python - "$out" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))
best = s["best"]["val/accuracy"]
print(f"best val accuracy {best['value']:.3f} at epoch {best['epoch']} ({s['wall_seconds']:.1f}s of training); "
      f"the MNIST-1D paper reports 94% for this CNN")
PY
