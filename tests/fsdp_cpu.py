"""Accelerate's FSDP on CPU processes (gloo), for tests: `python -m fsdp_cpu MODULE ARGS` runs
`python -m MODULE ARGS` with FSDP allowed on CPU.

Accelerate turns an FSDP config into FSDP only for GPU-like device types; on CPU it silently trains
plain data parallel instead, which is why `launcher.distributed` refuses FSDP without GPUs. PyTorch's
FSDP2 (`fully_shard`) itself runs on CPU tensors over gloo, and so do Accelerate's FSDP2 `prepare`,
`save_state` and `load_state` (DCP). This module lifts those two gates and nothing else, so a test runs
the launcher's real FSDP code path, with real sharded parameters and real per-rank DCP files, on CPU:

- Accelerate's state: where an FSDP plugin was given but the device type came out as CPU (MULTI_CPU,
  or NO for a single process), the type becomes FSDP and the plugin gets the mixed precision policy,
  as on GPUs; a single process gets a one-rank gloo process group, which FSDP2 needs (Accelerate
  starts none for one CPU process).
- `launcher.distributed.FSDP_NEEDS_GPU` is switched off.

Launch it with tests/configs/fsdp_cpu.yaml (distributed_type FSDP, so `accelerate launch` starts the
processes as it would on GPUs). Combine it with the exit recorder: `-m fsdp_cpu helpers launcher.train`.
"""

from __future__ import annotations

import runpy
import sys


def enable() -> None:
    import accelerate.state as state
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    import launcher.distributed

    original = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is None or self.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.NO):
            return
        if not dist.is_initialized():
            dist.init_process_group("gloo")  # torchrun's env:// variables (accelerate launch sets them)
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":  # what Accelerate's GPU branch does with the plugin
            plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = plugin
        # Every AcceleratorState() copies PartialState's shared fields over its own (accelerate.state).
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init
    launcher.distributed.FSDP_NEEDS_GPU = False


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m fsdp_cpu MODULE [ARGS...]")
    enable()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
