"""Time to accuracy on MNIST-1D (the paper's CNN): five recipes x N seeds, compared by launcher.compare.

    python bench/time_to_accuracy.py                             # 3 seeds, ~5 min on 2 CPU cores
    python bench/time_to_accuracy.py --seeds 5 --output_dir runs/tta --markdown tta.md

Recipes (recipes/*.yaml): mnist1d_baseline (the write-up's old setup: Adam 1e-3, constant), mnist1d_fast
(its new setup: AdamW, warmup, x0.96/epoch, plateau, clipping), mnist1d_cosine (the same with cosine
decay), mnist1d_paper (Greydanus & Kobak: Adam 1e-2, batch 100, 8,000 steps) and mnist1d_best (tuned
for the fewest steps). Each run is a real `python -m launcher.train` started by `python -m
launcher.compare --train ... --seeds N` (one after another, checkpoints off, one thread each), and the
numbers are that command's own: the optimizer steps, epochs and seconds of the first evaluation at or
above each target, best and final accuracy, mean +- std over the seeds ("(2/3)": only 2 of 3 seeds got
there; "-": none). Seconds are training time from the first step (evaluation included, start-up not).

Then two checks, printed below the tables:
- does the fast recipe need 2.5-3x fewer epochs than the baseline to 50% and to 80% (the write-up)?
- does the best recipe reach 94% in at most half the optimizer steps the paper recipe needs? If not
  every paper seed reaches 94%, the comparison is made at the highest target all of them reach.

Rerunning with the same --output_dir reuses the runs already completed there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = ["recipes/mnist1d_baseline.yaml", "recipes/mnist1d_fast.yaml", "recipes/mnist1d_cosine.yaml",
           "recipes/mnist1d_paper.yaml", "recipes/mnist1d_best.yaml"]
TARGETS = [0.5, 0.8, 0.9, 0.92, 0.94]
WRITE_UP_RANGE = (2.5, 3.0)


def train_and_compare(seeds: int, output_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "launcher.compare", "--train", *RECIPES, "--seeds", str(seeds),
           "--output_dir", str(output_dir), "--targets", ",".join(map(str, TARGETS)), "--format", "markdown",
           "--checkpoint.enabled=false", "--train.progress_bar=off", "--tracking.wandb.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"launcher.compare failed with status {proc.returncode}")
    return json.loads((output_dir / "compare.json").read_text())


def _group(result: dict, stem: str) -> dict:
    return next(g for g in result["groups"] if g["label"] == stem)


def _mean(group: dict, key: str) -> float | None:
    return group["stats"][key]["mean"]


def _all_reached(group: dict, key: str) -> bool:
    return group["stats"][key]["n"] == group["n"]


def checks(result: dict) -> list[str]:
    """The two questions of the benchmark, answered in sentences from compare's numbers."""
    lines = []
    base, fast = _group(result, "mnist1d_baseline"), _group(result, "mnist1d_fast")
    parts, verdicts = [], []
    for t in (0.5, 0.8):
        key = f"epochs_to/{t:g}"
        b, f = _mean(base, key), _mean(fast, key)
        if b is None or f is None:
            parts.append(f"{t:.0%}: not reached by {'the baseline' if b is None else 'the fast recipe'}")
            verdicts.append(False)
            continue
        ratio = b / f
        parts.append(f"{ratio:.1f}x to {t:.0%} ({f:.1f} vs {b:.1f} epochs)")
        verdicts.append(WRITE_UP_RANGE[0] <= ratio <= WRITE_UP_RANGE[1])
    claim = f"{WRITE_UP_RANGE[0]:g}-{WRITE_UP_RANGE[1]:g}x fewer epochs than the baseline to 50% and 80%"
    lines.append(f"- Fast recipe vs baseline (the write-up claims {claim}): " + "; ".join(parts) + ". "
                 + ("**Reproduced.**" if all(verdicts) else "**Not reproduced as stated** (see the ratios)."))

    paper, best = _group(result, "mnist1d_paper"), _group(result, "mnist1d_best")
    reached_94 = {g["label"]: f"{g['stats']['steps_to/0.94']['n']}/{g['n']}" for g in result["groups"]}
    lines.append("- Seeds reaching 94% (the paper's CNN figure): "
                 + ", ".join(f"{k.removeprefix('mnist1d_')} {v}" for k, v in reached_94.items()) + ".")
    common = [t for t in TARGETS if _all_reached(paper, f"steps_to/{t:g}")]
    if not common:
        lines.append("- The paper recipe reached none of the targets on every seed; no step comparison.")
        return lines
    t = max(common)
    key = f"steps_to/{t:g}"
    p, b = _mean(paper, key), _mean(best, key)
    where = "94%" if t == 0.94 else f"{t:.0%}, the highest target every paper seed reaches (94% is not)"
    if b is None or not _all_reached(best, key):
        lines.append(f"- Best vs paper at {where}: the best recipe did not reach it on every seed. **Target missed.**")
        return lines
    ok = b <= p / 2
    lines.append(f"- Best vs paper at {where}: {b:.0f} vs {p:.0f} optimizer steps (mean over seeds), "
                 f"{p / b:.1f}x fewer. " + ("**Target met** (at most half)." if ok else "**Target missed** (more than half)."))
    if t != 0.94 and _all_reached(best, "steps_to/0.94"):
        lines.append(f"- The best recipe reaches 94% on every seed, in {_mean(best, 'steps_to/0.94'):.0f} steps on average.")
    return lines


def markdown(result: dict, output_dir: Path, seeds: int) -> str:
    table = (output_dir / "compare.md").read_text().strip()
    return "\n".join([
        "## Time to accuracy: MNIST-1D CNN",
        "",
        f"`python bench/time_to_accuracy.py --seeds {seeds}`: {len(RECIPES)} recipes x {seeds} seeds, each a real "
        "`launcher.train` run (one process, one thread, checkpoints off), compared by `python -m launcher.compare "
        "--train ... --targets " + ",".join(map(str, TARGETS)) + "`. Mean ± std over seeds; `(k/n)`: only k of n "
        "seeds reached the target (mean over those); `-`: none did. Seconds: training time from the first step, "
        "evaluations included.",
        "",
        table,
        "",
        *checks(result),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--output_dir", default="", help="where the runs go (default: a new temporary directory)")
    p.add_argument("--markdown", default="", help="also write the section for bench/RESULTS.md here")
    a = p.parse_args()
    output_dir = Path(a.output_dir or tempfile.mkdtemp(prefix="bench-tta-")).resolve()
    result = train_and_compare(a.seeds, output_dir)
    text = markdown(result, output_dir, a.seeds)
    print("\n" + text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
