"""Weight layout for decoding on a CPU: the same values, stored the way a matrix-vector product reads fastest.

Decoding one token per row reads every weight once per step (a matrix-vector product), so batch-1 CPU decode is
bound by how fast the BLAS streams weights from memory. A Linear stores its weight (out, in) row-major; MKL's gemv
streams the same values stored input-major (the transpose, contiguous) faster where out >= in, while for down
projections (out < in) the row-major layout is the faster one. The gain is a one-row effect: at a few rows MKL takes
another path, which reads input-major weights no faster. `python -m bench.studies.gemv_layout` measures both layouts, at
one row and at four, on the machine at hand.

`gemv_layout_` re-lays out a model in place: every Linear weight with out >= in keeps its shape and values (exactly:
a copy, no arithmetic) and becomes a strided view of input-major storage; matmuls give the same results up to float
rounding, and a prompt's many-row matmuls run about as fast as before. Since that changes the storage of the
caller's weights, a LatentRuntime does it only when asked (`cpu_layout=True`: `kvconvert chat` and `profile speed`
at one row).
"""

from __future__ import annotations

import torch
from torch import nn


def prefers_input_major(weight: torch.Tensor) -> bool:
    """Whether a 2-D (out, in) weight reads faster input-major: out >= in (bench/studies/gemv_layout.py)."""
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
