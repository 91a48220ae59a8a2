"""Where a process computes: the device Ray gave an actor, bfloat16 autocast on GPUs, and the
device / peak-memory figures each stage reports (scripts/gpu_check.sh prints them per stage)."""

from __future__ import annotations

import contextlib

import torch


def actor_device() -> str:
    """The device of the calling Ray actor: "cuda" when Ray gave it a GPU, else "cpu"."""
    import ray

    return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"


def autocast(device: torch.device | str, bf16: bool):
    """bfloat16 autocast for forward passes on a GPU (`ray.bf16`); nothing on the CPU. Weights, gradients
    and AdamW state stay float32 either way."""
    if torch.device(device).type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_metrics(device: torch.device | str) -> dict:
    """Where a stage ran and its peak GPU memory (what scripts/gpu_check.sh prints per stage)."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"system/device": "cpu", "system/peak_gpu_memory_gb": 0.0}
    return {"system/device": f"cuda ({torch.cuda.get_device_name(device)})",
            "system/peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def where(metrics: dict) -> str:
    """"on cpu" / "on cuda (NVIDIA H100 ...), peak 31.2 GB": where a stage ran, from its metrics."""
    device = metrics.get("system/device", "cpu")
    peak = metrics.get("system/peak_gpu_memory_gb", 0.0)
    return f"on {device}" + (f", peak {peak:.1f} GB" if device != "cpu" else "")
