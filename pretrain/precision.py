"""Mixed precision policy: what runs in low precision, and what never does.

`train.precision`:
  fp32  everything in fp32.
  bf16  (recommended on GPUs) weights, buffers, optimiser state, batches, targets and loss
        reductions stay fp32; the forward runs under `torch.autocast(device, bfloat16)`, which
        DeepSpeed's `torch_autocast` section enters around the engine's forward (on CUDA, and
        on CPU ranks, so it is tested here). Linear-layer gradients are all-reduced in bf16
        (DeepSpeed's default for autocast); everything else in fp32. No loss scaling is needed.
  fp16  DeepSpeed's fp16 mode (for GPUs without bf16): fp16 weights with an fp32 master copy
        and DeepSpeed's dynamic loss scaling. DeepSpeed turns autocast off inside this engine,
        so the forward is plain fp16; batches still arrive in fp32, encoders cast their inputs
        to the weights' dtype, and objectives reduce their losses in fp32 (`fp32_region`).

Autocast lowers matmuls, and so `einsum` and `@`, to bf16. Geometry (Cartesian positions,
edge vectors, rotations, periodic residuals) and loss reductions therefore run inside
`fp32_region`, which turns autocast off and upcasts its tensors: fractional coordinates and
lattices are never rounded (an 8-bit mantissa moves a 10 Å cell's coordinate by ~0.02 Å).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def deepspeed_section(precision: str) -> dict:
    """The DeepSpeed config keys that implement `precision` (merged into the job's config)."""
    if precision == "fp32":
        return {}
    if precision == "bf16":
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                         "hysteresis": 2, "min_loss_scale": 1}}
    raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype the engine keeps the model's weights in (fp16 only under DeepSpeed's fp16 mode)."""
    return torch.float16 if precision == "fp16" else torch.float32


@contextmanager
def fp32_region(device: torch.device | str) -> Iterator[None]:
    """Autocast off on `device` for the block: geometry and loss reductions run in the dtype of
    their (fp32) inputs. Pair with `at_least_fp32` for network outputs entering the block."""
    device_type = torch.device(device).type
    with torch.autocast(device_type, enabled=False):
        yield


def at_least_fp32(*tensors: torch.Tensor):
    """Floating tensors below fp32 upcast to fp32 (fp32 and fp64 unchanged); one tensor or a tuple."""
    out = tuple(t.float() if t.is_floating_point() and t.element_size() < 4 else t for t in tensors)
    return out[0] if len(out) == 1 else out
