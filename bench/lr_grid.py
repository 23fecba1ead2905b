"""Does the LR range test point where real training says? A small grid of short runs vs find_lr.

    python bench/lr_grid.py                       # MNIST-1D CNN, batch 32, the default grid below
    python bench/lr_grid.py --lrs 1e-3,1e-2 --seeds 0 --num_epochs 2 --output_dir /tmp/grid

Each grid point is a real `python -m launcher.train` subprocess with the recipe's optimizer (AdamW,
weight decay, clipping) at a constant LR: no warmup, no decay, no plateau, no checkpoints. The best
LR is the one with the highest validation accuracy (best over the run's evaluations, averaged over
seeds). Then `python -m launcher.find_lr` runs on the same recipe and batch, and the two are
compared: the suggestion should be within `--tolerance` (a factor) of the grid's best LR.

Writes <output_dir>/grid.json (every run's numbers, the choice, the suggestion, the ratio) and
prints a table. Exit status 0 when the suggestion is within tolerance, 1 when it is not.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from launcher.errors import UsageError, run_cli  # noqa: E402

CONSTANT_SCHEDULE = ["--schedule.warmup_epochs=0", "--schedule.warmup_steps=0", "--schedule.decay=constant",
                     "--schedule.plateau.enabled=false", "--checkpoint.enabled=false",
                     "--train.progress_bar=off"]


def _env() -> dict[str, str]:
    # One thread per run: on a small shared CPU, torch's default thread pool makes a tiny model
    # many times slower (oversubscription), and the runs are sequential anyway.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled"}


def _run(cmd: list[str], log_path: Path) -> None:
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n" + "\n".join(tail))


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "val/accuracy" in r]


def train_point(recipe: str, lr: float, seed: int, num_epochs: int, batch_size: int, run_dir: Path,
                extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "launcher.train", "--recipe", recipe, "--output_dir", str(run_dir),
           f"--optim.lr={lr}", f"--train.seed={seed}", f"--train.num_epochs={num_epochs}",
           f"--train.batch_size={batch_size}", *CONSTANT_SCHEDULE, *extra]
    _run(cmd, run_dir.with_suffix(".log"))
    evals = _evals(run_dir)
    return {"lr": lr, "seed": seed, "best_val_accuracy": max(r["val/accuracy"] for r in evals),
            "final_val_accuracy": evals[-1]["val/accuracy"], "best_val_loss": min(r["val/loss"] for r in evals),
            "final_val_loss": evals[-1]["val/loss"]}


def run_find_lr(recipe: str, batch_size: int, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "launcher.find_lr", "--recipe", recipe, "--output_dir", str(out_dir),
           f"--train.batch_size={batch_size}", *extra]
    _run(cmd, out_dir.with_suffix(".log"))
    return json.loads((out_dir / "lr_find.json").read_text())


def _numbers(value: Any, name: str, kind: type = float) -> list:
    """fire turns `1e-3,1e-2` into a tuple and `1e-3` into a float; accept those and plain strings."""
    items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
    try:
        out = [kind(v) for v in items]
    except ValueError:
        raise UsageError(f"--{name}: expected {kind.__name__}s separated by commas, e.g. 1e-3,1e-2; got {value!r}") from None
    if not out or any(v < 0 or (kind is float and v == 0) for v in out):
        raise UsageError(f"--{name}: expected positive numbers; got {value!r}")
    return out


def main(recipe: str = "recipes/mnist1d.yaml", lrs: Any = "3e-4,1e-3,3e-3,1e-2,3e-2", seeds: Any = "0,1",
         num_epochs: int = 10, batch_size: int = 32, output_dir: str | None = None, tolerance: float = 3.0,
         train_args: str = "", find_lr_args: str = "") -> None:
    """Grid of short constant-LR trainings vs the LR range test's suggestion.

    Args:
      recipe: recipe YAML, relative to the repository root or absolute.
      lrs: grid of learning rates (optim.lr), comma separated.
      seeds: training seeds per LR (init and data order), comma separated.
      num_epochs: epochs per grid run.
      batch_size: train.batch_size for both the grid and find_lr (one process).
      output_dir: where runs and grid.json go; default runs/lr_grid-<timestamp>. Must not exist.
      tolerance: pass when best_lr / tolerance <= suggestion <= best_lr x tolerance.
      train_args: extra overrides for every grid run, space separated, given with '='
        (e.g. --train_args='--optim.weight_decay=0').
      find_lr_args: extra arguments for find_lr, the same way (e.g. --find_lr_args='--num_steps=200').
    """
    for name, value in (("train_args", train_args), ("find_lr_args", find_lr_args)):
        if not isinstance(value, str):
            raise UsageError(f"--{name} takes a string; write it with '=', e.g. --{name}='--optim.weight_decay=0'")
    grid = _numbers(lrs, "lrs")
    seed_list = _numbers(seeds, "seeds", int)
    out = Path(output_dir or REPO / "runs" / f"lr_grid-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise UsageError(f"--output_dir {str(out)!r} already exists; choose another")
    if tolerance < 1:
        raise UsageError(f"--tolerance is a factor >= 1; got {tolerance}")
    out.mkdir(parents=True)
    recipe = str((REPO / recipe) if not os.path.isabs(recipe) else recipe)

    runs = []
    for lr in grid:
        for seed in seed_list:
            runs.append(train_point(recipe, lr, seed, int(num_epochs), int(batch_size),
                                    out / f"lr{lr:g}-seed{seed}", train_args.split()))
            r = runs[-1]
            print(f"lr {lr:<8g} seed {seed}: best val/accuracy {r['best_val_accuracy']:.4f}  "
                  f"final {r['final_val_accuracy']:.4f}  best val/loss {r['best_val_loss']:.4f}", flush=True)
    table = []
    for lr in grid:
        rs = [r for r in runs if r["lr"] == lr]
        table.append({"lr": lr, **{k: statistics.mean(r[k] for r in rs) for k in
                                   ("best_val_accuracy", "final_val_accuracy", "best_val_loss", "final_val_loss")}})
    best = max(table, key=lambda row: (row["best_val_accuracy"], -row["best_val_loss"]))
    by_loss = min(table, key=lambda row: row["best_val_loss"])

    found = run_find_lr(recipe, int(batch_size), out / "find_lr", find_lr_args.split())
    suggestion = found["suggestion"]
    ratio = suggestion / best["lr"] if suggestion else float("nan")
    ok = suggestion is not None and 1 / tolerance <= ratio <= tolerance

    print(f"\n{'lr':>8}  {'best acc':>8}  {'final acc':>9}  {'best loss':>9}  (mean of {len(seed_list)} seed(s), "
          f"{num_epochs} epochs, batch {batch_size}, constant LR)")
    for row in table:
        mark = "  <- best" if row is best else ""
        print(f"{row['lr']:>8g}  {row['best_val_accuracy']:>8.4f}  {row['final_val_accuracy']:>9.4f}  "
              f"{row['best_val_loss']:>9.4f}{mark}")
    print(f"grid best lr: {best['lr']:g} (by val/accuracy; by val/loss: {by_loss['lr']:g})")
    print(f"find_lr suggestion: {suggestion:.3g}  (minimum/10: {found['min_lr_div_10']:.3g})")
    print(f"ratio suggestion / grid best: {ratio:.3g}  -> {'within' if ok else 'NOT within'} a factor {tolerance:g}")
    summary = {"recipe": recipe, "lrs": grid, "seeds": seed_list, "num_epochs": num_epochs, "batch_size": batch_size,
               "runs": runs, "table": table, "best_lr": best["lr"], "best_lr_by_val_loss": by_loss["lr"],
               "suggestion": suggestion, "min_lr_div_10": found["min_lr_div_10"], "ratio": ratio,
               "tolerance": tolerance, "within_tolerance": ok}
    (out / "grid.json").write_text(json.dumps(summary, indent=2))
    print(f"results: {out / 'grid.json'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main, name="bench/lr_grid.py")
