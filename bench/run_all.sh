#!/usr/bin/env bash
# Regenerate bench/RESULTS.md, every table in it:
#
#   bash bench/run_all.sh                 # ~15 min on 2 CPU cores; the GPU section runs where CUDA is present
#   bash bench/run_all.sh /tmp/R.md       # write somewhere else
#
# Runs, one after another: bench/startup.py, bench/overhead.py, bench/time_to_accuracy.py, bench/gpu.py
# (which says "skipped" without a GPU), then writes their sections under a header naming the machine
# (cores, CPU model), the versions (Python, torch, accelerate), the commit, the date and the load
# average before the run (other work on the machine makes timings noisier; the benchmarks report
# ratios measured side by side for that reason).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/RESULTS.md}
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export OMP_NUM_THREADS=1 WANDB_MODE=disabled MPLBACKEND=Agg
work=$(mktemp -d)
load_before=$(cut -d' ' -f1 /proc/loadavg)
started=$(date +%s)
(while sleep 10; do cut -d' ' -f1 /proc/loadavg; done > "$work/load.txt") &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true; rm -rf "$work"' EXIT

python bench/startup.py --markdown "$work/1-startup.md"
python bench/overhead.py --markdown "$work/2-overhead.md"
python bench/time_to_accuracy.py --output_dir "$work/tta" --markdown "$work/3-time_to_accuracy.md"
python bench/gpu.py --markdown "$work/4-gpu.md"

kill "$sampler" 2>/dev/null || true
load_max=$(sort -g "$work/load.txt" | tail -1)
minutes=$(( ($(date +%s) - started + 59) / 60 ))
python - "$work" "$out" "$load_before" "${load_max:-0}" "$minutes" <<'EOF'
import datetime, os, platform, subprocess, sys
from pathlib import Path

import accelerate
import torch

work, out, load_before, load_max, minutes = sys.argv[1:]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
cores = os.cpu_count()
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
# The benchmarks themselves keep at most 2 processes busy: load beyond that came from other work.
shared = float(load_before) >= 0.5 or float(load_max) > 2.5
stamp = (f"_Machine: {cores} x {cpu}, GPU: {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
         f"accelerate {accelerate.__version__}; commit {commit}{' (with local changes)' if dirty else ''}; {date}; "
         f"load average {load_before} before the run, at most {load_max} during it"
         f"{' (shared with other work)' if shared else ''}._")
header = [
    "# Benchmark results",
    "",
    "Regenerate with `bash bench/run_all.sh` (all four sections, ~" + minutes + " min here). Each section names "
    "its own command; the scripts' docstrings say exactly what is measured.",
    "",
    f"- Machine: {cores} CPU cores ({cpu}), GPU: {gpu}, {platform.system()} {platform.release()}",
    f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, accelerate {accelerate.__version__}",
    f"- Commit {commit}{' with local changes' if dirty else ''}, {date}",
    f"- Load average (1 min): {load_before} before the run, at most {load_max} during it (sampled every 10 s; "
    "the benchmarks themselves account for up to 2)."
    + (" **The timings were taken while other work shared the machine**: absolute numbers (seconds, steps/s) are "
       "noisy; the ratios are measured side by side (interleaved, per-step minima) to stay comparable."
       if shared else " No sign of other work on the machine during the run."),
]
sections = []
for path in sorted(Path(work).glob("*.md")):
    lines = path.read_text().rstrip().splitlines()
    sections += ["", *lines[:1], "", stamp, *lines[1:]]
Path(out).write_text("\n".join(header + sections) + "\n")
print(f"wrote {out}")
EOF
