"""Realistic mistakes across every entry point: one `error: ...` line, exit status 2, nothing written.

Each case runs in this process through `launcher.cli.main` (the `launcher` console script), in an
empty working directory next to a folder of input files; the test compares both folders before and
after. A few end-to-end checks run as subprocesses: `python -m launcher.X`, and two processes under
`launcher train --num_processes 2`.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, TINY, env

R = str(ROOT / "recipes" / "mnist1d.yaml")

# Recipe files with mistakes, written into the input folder as NAME.yaml.
FILES = {
    "empty": "",
    "comments": "# only a comment\n",
    "dup_leaf": "optim:\n  lr: 0.01\n  lr: 0.02\n",
    "dup_section": "optim:\n  lr: 0.01\ntrain:\n  seed: 1\noptim:\n  lr: 0.02\n",
    "dup_nested": "schedule:\n  plateau:\n    patience: 3\n    patience: 4\n",
    "toplist": "- optim\n- train\n",
    "scalar": "just some text\n",
    "bad_yaml": "optim:\n  lr: 0.01\n lr2: [\n",
    "unknown": "optim:\n  lrr: 0.01\n",
    "wrong_type": "train:\n  num_epochs: many\n",
    "section_value": "optim: 5\n",
    "flat_key": "lr: 0.01\n",
    "bad_choice": "schedule:\n  decay: exp\n",
    "keras_threshold": "schedule:\n  plateau:\n    style: keras\n    threshold: 0.01\n",
}

# (argv for `launcher`, fragments of the error line). {in} is the input folder, {file} a plain file in it.
CASES = [
    # train: flags
    (["train"], ["--recipe is required"]),
    (["train", "--recipe", "{in}/missing.yaml"], ["recipe file not found"]),
    (["train", "--recipe", "{in}"], ["is a directory"]),
    (["train", "--recipe", "{in}/empty"], ["recipe file not found", "did you mean --recipe", "empty.yaml"]),
    (["train", "--recipe", R, "--optim.lrr=1"], ["optim.lrr", "did you mean optim.lr?"]),
    (["train", "--recipe", R, "--lr=0.1"], ["--lr", "did you mean --optim.lr?"]),
    (["train", "--recipe", R, "--resum=auto"], ["--resum", "did you mean --resume?"]),
    (["train", "--recipe", R, "--outdir=x"], ["--outdir", "did you mean --output_dir?"]),
    (["train", "--recipe", R, "--print_confg"], ["did you mean --print_config?"]),
    (["train", "--recipe", R, "--epochs=3"], ["--epochs", "train.num_epochs"]),
    (["train", "--recipe", R, "--train.num_epochs=abc"], ["train.num_epochs", "integer"]),
    (["train", "--recipe", R, "--optim.lr=-1"], ["optim.lr", "positive"]),
    (["train", "--recipe", R, "--optim.lr=0.1.2"], ["optim.lr", "number"]),
    (["train", "--recipe", R, "--optim.betas=0.9"], ["optim.betas", "2 values"]),
    (["train", "--recipe", R, "--schedule.decay=exp"], ["schedule.decay", "exponential"]),
    (["train", "--recipe", R, "--schedule.warmup_steps=10", "--schedule.warmup_epochs=1"], ["not both"]),
    (["train", "--recipe", R, "--schedule.plateau.style=tf"], ["schedule.plateau.style", "keras"]),
    (["train", "--recipe", R, "--schedule.plateau.min_delta=0.1"], ["min_delta", "style=keras"]),
    (["train", "--recipe", R, "--schedule.granularity=epoch", "--schedule.warmup_epochs=1.5"],
     ["warmup_epochs", "whole number"]),
    (["train", "--recipe", R, "--schedule.granularity=epoch", "--schedule.decay=cosine"], ["granularity"]),
    (["train", "--recipe", R, "--schedule.plateau.metric=val/los"], ["schedule.plateau.metric", "val/loss"]),
    (["train", "--recipe", R, "--tracking.target_metric=val/acc"], ["tracking.target_metric", "val/accuracy"]),
    (["train", "--recipe", R, "--data.root={file}"], ["--data.root", "not a directory"]),
    (["train", "--recipe", R, "--data.root={file}/sub"], ["--data.root", "is a file"]),
    (["train", "--recipe", R, "--output_dir={file}"], ["--output_dir", "not a directory"]),
    (["train", "--recipe", R, "--output_dir={file}/run"], ["--output_dir", "is a file"]),
    (["train", "--recipe", R, "--resume=nowhere/step_1"], ["--resume", "not found"]),
    (["train", "--recipe", R, "--resume"], ["--resume needs a value"]),
    (["train", "--recipe", R, "oops"], ["unexpected argument 'oops'"]),
    (["train", R, "{in}/other.yaml"], ["unexpected argument"]),
    (["train", "--recipe", R, "--train.batch_size=5000"], ["train.batch_size", "lower"]),
    (["train", "--recipe", R, "--task.name=nope"], ["task.name", "unknown task"]),
    (["train", "--recipe", R, "--task.options.num_trian=5"], ["task.options.num_trian", "num_train"]),
    # train: recipe files
    (["train", "--recipe", "{in}/empty.yaml"], ["empty.yaml", "is empty", "line 1"]),
    (["train", "--recipe", "{in}/comments.yaml"], ["comments.yaml", "is empty"]),
    (["train", "--recipe", "{in}/dup_leaf.yaml"], ["dup_leaf.yaml", "line 3", "'lr' is given twice", "line 2"]),
    (["train", "--recipe", "{in}/dup_section.yaml"], ["line 5", "'optim' is given twice", "line 1"]),
    (["train", "--recipe", "{in}/dup_nested.yaml"], ["line 4", "'patience'"]),
    (["train", "--recipe", "{in}/toplist.yaml"], ["toplist.yaml", "line 1", "mapping", "a list"]),
    (["train", "--recipe", "{in}/scalar.yaml"], ["scalar.yaml", "mapping", "a single value"]),
    (["train", "--recipe", "{in}/bad_yaml.yaml"], ["bad_yaml.yaml", "not valid YAML at line"]),
    (["train", "--recipe", "{in}/unknown.yaml"], ["optim.lrr", "did you mean optim.lr?"]),
    (["train", "--recipe", "{in}/wrong_type.yaml"], ["train.num_epochs", "integer"]),
    (["train", "--recipe", "{in}/section_value.yaml"], ["optim", "mapping"]),
    (["train", "--recipe", "{in}/flat_key.yaml"], ["unknown recipe key 'lr'", "optim.lr"]),
    (["train", "--recipe", "{in}/bad_choice.yaml"], ["schedule.decay"]),
    (["train", "--recipe", "{in}/keras_threshold.yaml"], ["threshold", "min_delta"]),
    # train under the console script's launcher options (checked here, before any process starts)
    (["train", "--num_processes", "2", "--recipe", R, "--optim.lrr=1"], ["did you mean optim.lr?"]),
    (["train", "--num_processes", "2", "--recipe", R, "--resum=auto"], ["did you mean --resume?"]),
    (["train", "--num_processes", "2", "--recipe", "{in}/dup_leaf.yaml"], ["given twice"]),
    (["train", "--num_processes", "2", "--recipe", R, "--output_dir={file}/run"], ["--output_dir", "is a file"]),
    (["train", "--num_processes", "0", "--recipe", R], ["--num_processes", ">= 1"]),
    (["train", "--num_processes", "two", "--recipe", R], ["--num_processes"]),
    (["train", "--recipe", R, "--num_processes"], ["--num_processes needs a value"]),
    (["train", "--config_file", "{in}/none.yaml", "--recipe", R], ["--config_file", "not found"]),
    (["find_lr", "--num_processes", "2", "--recipe", R, "--optim.lrr=1"], ["did you mean optim.lr?"]),
    # schedule
    (["schedule"], ["--recipe is required"]),
    (["schedule", "--recipe", R, "--steps_per_epoch=many"], ["--steps_per_epoch", "whole number"]),
    (["schedule", "--recipe", R, "--steps_per_epoch=0"], ["--steps_per_epoch", ">= 1"]),
    (["schedule", "--recipe", R, "--steps_per_epoch=2.5"], ["--steps_per_epoch"]),
    (["schedule", "--recipe", R, "--num_processes=0"], ["--num_processes", ">= 1"]),
    (["schedule", "--recipe", R, "--num_processes=two"], ["--num_processes"]),
    (["schedule", "--recipe", R, "--num_epochs=0"], ["--num_epochs"]),
    (["schedule", "--recipe", R, "--plot={file}/lr.png"], ["--plot", "is a file"]),
    (["schedule", "--recipe", R, "--plot={in}"], ["--plot", "is a directory"]),
    (["schedule", "--recipe", R, "--format=yaml"], ["--format", "table, json"]),
    (["schedule", "--recipe", R, "--plot=lr.pnj"], ["--plot", ".pnj"]),
    (["schedule", "--recipe", R, "--stepsperepoch=10"], ["did you mean --steps_per_epoch?"]),
    (["schedule", "--recipe", R, "--optim.lrr=1"], ["did you mean optim.lr?"]),
    (["schedule", "--recipe", "{in}/empty.yaml"], ["is empty"]),
    (["schedule", "--recipe", R, "10"], ["unexpected argument '10'"]),
    # find_lr
    (["find_lr"], ["--recipe is required"]),
    (["find_lr", "--recipe", R, "--start_lr=0"], ["--start_lr", "> 0"]),
    (["find_lr", "--recipe", R, "--start_lr=1e-2", "--end_lr=1e-3"], ["--end_lr", "larger"]),
    (["find_lr", "--recipe", R, "--num_steps=5"], ["--num_steps", ">= 10"]),
    (["find_lr", "--recipe", R, "--beta=1"], ["--beta"]),
    (["find_lr", "--recipe", R, "--diverge_factor=1"], ["--diverge_factor"]),
    (["find_lr", "--recipe", R, "--num_stpes=100"], ["did you mean --num_steps?"]),
    (["find_lr", "--recipe", R, "--apply={file}"], ["--apply", "already exists"]),
    (["find_lr", "--recipe", R, "--apply={in}/nodir/out.yaml"], ["--apply", "does not exist"]),
    (["find_lr", "--recipe", R, "--output_dir={file}/out"], ["--output_dir", "is a file"]),
    (["find_lr", "--recipe", R, "--plot={file}/curve.png"], ["--plot", "is a file"]),
    (["find_lr", "--recipe", R, "--plot=curve.jgp"], ["--plot", ".jgp"]),
    (["find_lr", "--recipe", R, "--data.root={file}"], ["--data.root"]),
    (["find_lr", "--recipe", "{in}/dup_nested.yaml"], ["given twice"]),
    # slurm
    (["slurm", "render", "--recipe", R], ["required", "--nodes"]),
    (["slurm", "render", "--recipe", R, "--nodes", "0", "--gpus_per_node", "0", "--time", "00:10:00"],
     ["--nodes", ">= 1"]),
    (["slurm", "render", "--recipe", R, "--nodes", "1", "--gpus_per_node", "0", "--time", "4h"], ["--time"]),
    (["slurm", "render", "--recipe", R, "--nodes", "1", "--gpus_per_node", "0", "--time", "00:10:00",
      "--nodse", "1"], ["--nodse", "did you mean --nodes?"]),
    (["slurm", "render", "--recipe", R, "--node", "1", "--gpus_per_node", "0", "--time", "00:10:00"], ["--node"]),
    (["slurm", "render", "--recipe", R, "--nodes", "1", "--gpus_per_node", "0", "--time", "00:10:00",
      "--output_dir", "{file}/run"], ["--output_dir", "is a file"]),
    (["slurm", "render", "--recipe", R, "--nodes", "1", "--gpus_per_node", "0", "--time", "00:10:00",
      "--", "--optim.lrr=1"], ["did you mean optim.lr?"]),
    (["slurm", "render", "--recipe", R, "--nodes", "1", "--gpus_per_node", "0", "--time", "00:10:00",
      "--optim.lr=1"], ["after a bare --"]),
    (["slurm", "render", "--recipe", "{in}/empty.yaml", "--nodes", "1", "--gpus_per_node", "0", "--time",
      "00:10:00"], ["is empty"]),
    (["slurm", "rendr"], ["invalid choice"]),
    # the console script itself, and compare through it
    (["trian"], ["unknown command 'trian'", "did you mean train?"]),
    (["schedul", "--recipe", R], ["did you mean schedule?"]),
    (["compare", "{in}/no_such_run"], ["no_such_run"]),
    (["compare", "{in}/no_such_run", "--plto=x.png"], ["--plto", "did you mean --plot?"]),
]


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            st = path.stat()
            out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def folders(tmp_path, monkeypatch):
    inputs, work = tmp_path / "in", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    for name, text in FILES.items():
        (inputs / f"{name}.yaml").write_text(text)
    (inputs / "plain.txt").write_text("a file, not a directory\n")
    monkeypatch.chdir(work)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return inputs, work


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize(("argv", "fragments"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_mistake_is_one_line_exit_2_nothing_written(folders, capsys, argv, fragments):
    from launcher.cli import main

    inputs, work = folders
    argv = [a.replace("{in}", str(inputs)).replace("{file}", str(inputs / "plain.txt")) for a in argv]
    before = _snapshot(inputs, work)
    status = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, (status, out[-500:], err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert out == ""
    assert _snapshot(inputs, work) == before


@pytest.mark.skipif(importlib.util.find_spec("launcher.sweep") is not None, reason="launcher.sweep is installed")
def test_sweep_without_its_module_is_one_line(folders, capsys):
    from launcher.cli import main

    assert main(["sweep", "--recipe", R]) == 2
    assert capsys.readouterr().err.strip() == "error: launcher sweep is not available in this installation " \
                                              "(no module launcher.sweep)"


def test_help_everywhere_is_fast_and_imports_no_torch():
    code = ("import sys, contextlib, io\n"
            "from launcher.cli import main\n"
            "for argv in ([], ['--help'], ['train', '--help'], ['schedule', '--help'], ['find_lr', '--help'],\n"
            "             ['slurm', '--help'], ['train', '--num_processes', '2', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
            "        assert main(argv) == 0, argv\n"
            "    assert 'usage' in buf.getvalue(), argv\n"
            "print([m for m in ('torch', 'wandb', 'deepspeed', 'accelerate') if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("module", ["launcher.train", "launcher.schedule", "launcher.find_lr"])
def test_python_m_entry_points_share_the_rules(tmp_path, module):
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 1\n  lr: 2\n")
    for args, fragment in ((["--recipe", "dup.yaml"], "line 3: key 'lr' is given twice"),
                           (["--recipe", R, "--resum=auto" if module == "launcher.train" else "--plto=x"],
                            "did you mean --")):
        r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env(),
                           cwd=tmp_path, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dup.yaml"]


def _launcher(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          env=env(PYTHONWARNINGS="default"), cwd=cwd, timeout=300)


def test_two_processes_usage_error_is_one_line(tmp_path):
    r = _launcher("train", "--num_processes", "2", "--recipe", R, "--optim.lrr=1", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: unknown recipe key 'optim.lrr'; did you mean optim.lr?\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_processes_task_error_and_warnings_are_one_line_each(tmp_path):
    # Found by the training processes (needs the task): still one line, exit 2, nothing written.
    r = _launcher("train", "--num_processes", "2", "--recipe", R, "--schedule.plateau.metric=val/los",
                  "--output_dir", "run", cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "schedule.plateau.metric" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
    # A warning (warmup as long as the run) from both processes: printed once, as one line.
    r = _launcher("train", "--num_processes", "2", "--recipe", R, *TINY, "--train.num_epochs=1",
                  "--output_dir", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    warnings = [line for line in lines if "warmup" in line]
    assert warnings == ["warning: schedule: warmup (8 steps) is as long as the whole run (8 steps); "
                        "the LR never reaches its base value"], r.stderr
    assert all(line.startswith("warning: ") for line in lines), r.stderr
    assert os.path.isfile(tmp_path / "run" / "summary.json")
