"""GPU checks (bf16, fp16 with loss scaling, FSDP2, DeepSpeed ZeRO-3/ZeRO-2 fp16), one GPU, a few steps each.

The cases live in bench/gpu_check.py (which also runs them as a script with a pass/fail table);
here each is one test. Skipped without CUDA.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


GPU_CHECK = _gpu_check()


@pytest.mark.parametrize("case", GPU_CHECK.CASES, ids=[c.name for c in GPU_CHECK.CASES])
def test_case(case, tmp_path):
    ok, detail, _ = GPU_CHECK.run_case(case, tmp_path)
    log = tmp_path / f"{case.name}.log"
    assert ok, f"{detail}\n{log.read_text()[-4000:] if log.exists() else ''}"
