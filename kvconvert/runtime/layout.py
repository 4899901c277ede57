"""Weight layout for decoding on a CPU: the same values, stored the way a matrix-vector product reads fastest.

Decoding one token per row reads every weight once per step (a matrix-vector product), so batch-1 CPU decode is
bound by how fast the BLAS streams weights from memory. A Linear stores its weight (out, in) row-major, and on this
project's 2-core AMD EPYC, MKL's gemv streams that layout at about 10 GB/s, but the same values stored input-major
(the transpose, contiguous) at 16-19 GB/s, where the machine reads 25 GB/s; for down projections (out < in) the
row-major layout is the faster one. `python bench/gemv_layout.py` measures both layouts on the machine at hand.

The gain is a one-row effect: at four rows MKL takes another path, which reads input-major weights 0-13% slower.
So on CPU a one-row runtime (chat) re-lays out, in place, every Linear weight with out >= in (and its own folded
copies): the parameter keeps its shape and values (exactly: a copy, no arithmetic) and becomes a strided view of
input-major storage; matmuls give the same results up to float rounding, and a prompt's many-row matmuls run about
as fast as before. SmolLM2-135M's 2% conversion decodes a step in about 56 ms instead of 79 here
(bench/results/gemv_layout_cpu.json, speed_cpu_rope_latent.json).
"""

from __future__ import annotations

import torch
from torch import nn


def prefers_input_major(weight: torch.Tensor) -> bool:
    """Whether a 2-D (out, in) weight reads faster input-major: out >= in (measured, see the module docstring)."""
    return weight.dim() == 2 and weight.shape[0] >= weight.shape[1]


def is_input_major(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride() == (1, weight.shape[0])


def gemv_layout(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) with the same values, stored input-major where that reads faster; otherwise itself."""
    if not prefers_input_major(weight) or is_input_major(weight) or weight.shape[1] == 1:
        return weight
    return weight.t().contiguous().t()


@torch.no_grad()
def gemv_layout_(model: nn.Module) -> int:
    """Re-lay out every Linear weight of `model` in place by `gemv_layout` (tied weights once; idempotent).
    Returns the bytes moved."""
    moved, seen = 0, set()
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        data = module.weight.data  # (a new tensor object at every access)
        relaid = gemv_layout(data)
        if relaid is not data:
            module.weight.data = relaid
            moved += relaid.nbytes
    return moved
