"""Start-up: `--help` without heavy imports, and the time from launch to the first optimizer step.

    python bench/startup.py                      # median of 7 (--help) and 5 / 3 (first step, 1 / 2 processes)
    python bench/startup.py --repeats 3 --markdown startup.md

1. `python -m launcher.train --help`: wall time of the whole process (target < 0.5 s), next to a bare
   `python -c pass` for scale, and the heavy modules (torch, wandb, deepspeed, accelerate) the help
   path imported (should be none).
2. Launch to first optimizer step, for `python -m launcher.train --recipe recipes/mnist1d.yaml` and
   for 2 processes under `accelerate launch --config_file accelerate_configs/cpu_ddp.yaml`. The child
   is launcher.train's own CLI, run by this file with timestamps added: when the Python code starts,
   when torch + the launcher are imported, when the Trainer is built (Accelerate, data, model,
   optimizer), and when the first optimizer step has finished; rank 0's clock, against the moment the
   parent started the command. One warm-up launch first (file caches), then the median of N.
"""

import time

_T0 = time.time()  # before any other import: when this process's Python code began

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "wandb", "deepspeed", "accelerate")
RECIPE = "recipes/mnist1d.yaml"


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------


def child_help_imports() -> None:
    """Run launcher.train --help in this process, then report which heavy modules it imported."""
    import contextlib
    import runpy

    sys.argv = ["launcher.train", "--help"]
    with contextlib.suppress(SystemExit):
        runpy.run_module("launcher.train", run_name="__main__")
    sys.stdout = sys.__stdout__
    print("HEAVY " + json.dumps([m for m in HEAVY if m in sys.modules]))


def child_train(out: str, argv: list[str]) -> None:
    """launcher.train's CLI with timestamps: imports done, Trainer built, first optimizer step done."""
    marks = {"python_start": _T0}
    import launcher.train
    import launcher.trainer

    marks["imported"] = time.time()
    trainer_cls = launcher.trainer.Trainer
    init, step = trainer_cls.__init__, trainer_cls.train_step

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        marks["trainer_built"] = time.time()

    def timed_step(self, batch):
        result = step(self, batch)  # True once an optimizer step completed
        if result and "first_step" not in marks:
            marks["first_step"] = time.time()
            if self.accelerator.is_main_process:
                Path(out).write_text(json.dumps(marks))
        return result

    trainer_cls.__init__ = timed_init
    trainer_cls.train_step = timed_step
    sys.argv = ["launcher.train", *argv]
    launcher.train.cli()


def child_plain(out: str) -> None:
    """The floor: a hand-written loop's start on the same task (torch, data, model, AdamW, one step)."""
    marks = {"python_start": _T0}
    import torch
    import torch.nn.functional as F

    from launcher.config import DataConfig
    from launcher.tasks import data_root
    from launcher.tasks.mnist1d import ConvNet, load_arrays

    marks["imported"] = time.time()
    arrays = load_arrays(data_root(DataConfig()))
    x, y = torch.from_numpy(arrays["x"]).float(), torch.from_numpy(arrays["y"]).long()
    model = ConvNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    marks["trainer_built"] = time.time()
    loss = F.cross_entropy(model(x[:32]), y[:32])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    marks["first_step"] = time.time()
    Path(out).write_text(json.dumps(marks))


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def measure_help(repeats: int) -> dict:
    bare = [_wall([sys.executable, "-c", "pass"]) for _ in range(repeats)]
    help_times = [_wall([sys.executable, "-m", "launcher.train", "--help"]) for _ in range(repeats + 1)][1:]
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_help_imports"], cwd=REPO, env=_env(),
                          capture_output=True, text=True)
    heavy = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("HEAVY "))[6:])
    return {"python_pass_s": statistics.median(bare), "help_s": statistics.median(help_times),
            "help_all_s": help_times, "heavy_imports": heavy}


def launch_once(nproc: int, work: Path, plain: bool = False) -> dict:
    run = Path(tempfile.mkdtemp(dir=work))
    out = run / "marks.json"
    args = ["--recipe", RECIPE, "--output_dir", str(run / "run"), "--checkpoint.enabled=false",
            "--train.progress_bar=off", "--train.num_epochs=1"]
    child = [str(Path(__file__).resolve()), "_train", str(out), *args]
    if plain:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_plain", str(out)]
    elif nproc == 1:
        cmd = [sys.executable, *child]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml",
               "--num_processes", str(nproc), *child]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed (status {proc.returncode}): {proc.stderr[-2000:]}")
    marks = json.loads(out.read_text())
    return {k: v - start for k, v in marks.items()}


def measure_first_step(nproc: int, repeats: int, work: Path, plain: bool = False) -> dict:
    launch_once(nproc, work, plain)  # warm-up: file caches, compiled bytecode
    runs = [launch_once(nproc, work, plain) for _ in range(repeats)]
    return {"nproc": nproc, "plain": plain, "repeats": repeats, "runs": runs,
            **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}


def markdown(help_result: dict, first: list[dict], repeats: int) -> str:
    h = help_result
    verdict = "met" if h["help_s"] < 0.5 and not h["heavy_imports"] else "missed"
    lines = [
        "## Start-up",
        "",
        f"`python bench/startup.py --repeats {repeats}`; medians.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| `python -c pass` (the interpreter alone) | {h['python_pass_s']:.3f} |",
        f"| `python -m launcher.train --help` | **{h['help_s']:.3f}** (target < 0.5: {verdict}) |",
        "",
        "Heavy modules imported by `--help`: " + (", ".join(h["heavy_imports"]) or "none")
        + f" (checked: {', '.join(HEAVY)}).",
        "",
        f"Launch to first optimizer step (`{RECIPE}`; seconds since the command was started, rank 0):",
        "",
        "| processes | how | Python code starts | torch (+ launcher) imported | Trainer (or model + optimizer) built "
        "| **first step done** |",
        "|---|---|---|---|---|---|",
    ]
    for f in first:
        how = "plain PyTorch: import, data, model, AdamW, one step" if f["plain"] else \
            "`python -m launcher.train`" if f["nproc"] == 1 else \
            "`accelerate launch --config_file accelerate_configs/cpu_ddp.yaml`"
        lines.append(f"| {f['nproc']} | {how} | {f['python_start']:.2f} | {f['imported']:.2f} | "
                     f"{f['trainer_built']:.2f} | **{f['first_step']:.2f}** |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["_help_imports"]:
        return child_help_imports()
    if sys.argv[1:2] == ["_plain"]:
        return child_plain(sys.argv[2])
    if sys.argv[1:2] == ["_train"]:
        return child_train(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="launches per measurement (--help: 2 more)")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--markdown", default="", help="also write the section for bench/RESULTS.md here")
    a = p.parse_args()
    help_result = measure_help(a.repeats + 2)
    print(f"--help: {help_result['help_s']:.3f} s (python -c pass {help_result['python_pass_s']:.3f} s), "
          f"heavy imports: {help_result['heavy_imports'] or 'none'}", flush=True)
    first = []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as work:
        first.append(measure_first_step(1, a.repeats, Path(work), plain=True))
        print(f"plain PyTorch: first optimizer step done {first[0]['first_step']:.2f} s after launch", flush=True)
        for n in (int(x) for x in a.nprocs.split(",")):
            r = measure_first_step(n, a.repeats if n == 1 else max(1, a.repeats - 2), Path(work))
            first.append(r)
            print(f"{n} process(es): first optimizer step done {r['first_step']:.2f} s after launch "
                  f"(imports {r['imported']:.2f}, Trainer built {r['trainer_built']:.2f})", flush=True)
    text = markdown(help_result, first, a.repeats) + "\n\n" + (
        "Creating the first torch optimizer imports `torch._dynamo` (~0.9 s here; torch's `add_param_group` is "
        "wrapped by `torch._disable_dynamo`), so the plain loop and the launcher both pay it; the rest of the "
        "launcher's extra time is Accelerate's import and set-up. Two processes add `accelerate launch` "
        "(its own Python start and torch import) before the workers start.")
    print("\n" + text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
