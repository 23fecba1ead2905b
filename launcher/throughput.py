"""Throughput and MFU (model FLOPs utilisation) of an epoch, for the evaluation row."""

from __future__ import annotations

from typing import Any

KNOWN_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121, "V100": 125}
"""Dense bf16 peak TFLOP/s of one GPU, by a substring of its name."""


def peak_flops(peak_tflops: float, accelerator) -> float:
    """Peak FLOP/s of one device: train.peak_tflops, else the bf16 dense peak of a known GPU, else 0."""
    if peak_tflops:
        return peak_tflops * 1e12
    if accelerator.device.type != "cuda":
        return 0.0
    import torch

    name = torch.cuda.get_device_name(accelerator.device)
    return next((tflops * 1e12 for key, tflops in KNOWN_PEAK_TFLOPS.items() if key in name), 0.0)


def throughput(plan, task, epoch_seconds: float, peak_tflops: float, accelerator) -> dict[str, Any]:
    """samples/s, and for token tasks tokens/s and MFU (needs the task's flops_per_token and a known peak)."""
    out = {"throughput/samples_per_sec": plan.steps_per_epoch * plan.global_batch / epoch_seconds}
    if task.tokens_per_sample:
        out["throughput/tokens_per_sec"] = out["throughput/samples_per_sec"] * task.tokens_per_sample
        peak = peak_flops(peak_tflops, accelerator)
        if peak and task.flops_per_token:
            out["throughput/mfu"] = (out["throughput/tokens_per_sec"] * task.flops_per_token
                                     / (peak * accelerator.num_processes))
    return out
