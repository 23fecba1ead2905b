"""Count host reads and Python-level collectives of a training run, as a launcher hook.

    LAUNCHER_HOOKS=sync_count:SyncCounter PYTHONPATH=bench SYNC_COUNT_DIR=out/ \
        accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m launcher.train --recipe R

From the first optimizer step to the end of training (evaluations, flushes and checkpoints
included; start-up and shutdown not), every call of `Tensor.item / tolist / __bool__ / __float__ /
__int__` made from Python and every `torch.distributed` collective is counted, by the package of
the calling code (launcher, accelerate, torch, ...). A call made inside a counted collective is part
of it and not counted again. DDP's gradient all-reduce runs in C++ (its reducer) and is not a
Python-level call, so it is not counted: it is the one reduction every data-parallel loop needs.
Each rank writes SYNC_COUNT_DIR/rank<R>.json with the counts and the number of optimizer steps.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from launcher.hooks import Hook

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "gather", "gather_object",
               "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv")


def _package(depth: int = 2) -> str:
    filename = sys._getframe(depth).f_code.co_filename
    parts = Path(filename).parts
    for name in ("launcher", "accelerate", "deepspeed", "torch", "tqdm", "wandb"):
        if name in parts:
            return name
    return "other"


class SyncCounter(Hook):
    def __init__(self):
        self.reads: Counter[str] = Counter()
        self.collectives: Counter[str] = Counter()
        self._local = threading.local()
        self._originals: list[tuple[object, str, object]] = []
        self.first_step = 0

    def _inside(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    def _wrap(self, owner, name: str, counter: Counter, kind: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return
        counter_self = self

        def wrapper(*args, **kwargs):
            if not counter_self._inside():
                counter[f"{kind}:{name} from {_package()}"] += 1
            counter_self._local.depth = getattr(counter_self._local, "depth", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                counter_self._local.depth -= 1

        self._originals.append((owner, name, original))
        setattr(owner, name, wrapper)

    def on_train_start(self, trainer) -> None:
        self.first_step = trainer.state.step
        for name in HOST_READS:
            self._wrap(torch.Tensor, name, self.reads, "read")
        for name in COLLECTIVES:
            for module in (dist, c10d):
                if getattr(module, name, None) is not None and not any(
                        o is module and n == name for o, n, _ in self._originals):
                    self._wrap(module, name, self.collectives, "collective")

    def on_finish(self, trainer, summary) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()
        steps = trainer.state.step - self.first_step
        out = {"rank": trainer.accelerator.process_index, "optimizer_steps": steps,
               "host_reads": sum(self.reads.values()), "collectives": sum(self.collectives.values()),
               "reads_by_call": dict(self.reads), "collectives_by_call": dict(self.collectives)}
        directory = os.environ.get("SYNC_COUNT_DIR", trainer.run_dir)
        os.makedirs(directory, exist_ok=True)
        Path(directory, f"rank{out['rank']}.json").write_text(json.dumps(out, indent=2))
