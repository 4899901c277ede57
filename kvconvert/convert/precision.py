"""The precision of a conversion's forwards that only sample or measure: the source writing its calibration text and
the planner's judge (held-out and recall-probe KLs of the source and each judged plan).

Those forwards are most of a conversion's time on a CPU (docs/results.md, "Conversion time"), and on one with native
bfloat16 (AVX512-BF16, AMX) or on a GPU they run about twice as fast under bfloat16 autocast. What the fits are made
of stays exact: the calibration statistics' forward runs in float32 and the moments and fits in float64, and the
logit check before export compares float32 against float32. "auto" takes bfloat16 where a matmul measured here is
faster in it, float32 elsewhere (a CPU without native bfloat16 emulates it, slower than float32).
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from ..errors import KvconvertError

JUDGE_DTYPES = ("auto", "float32", "bfloat16")
BF16_MIN_SPEEDUP = 1.3  # "auto" takes bfloat16 where a matmul runs at least this much faster in it


def _matmul_seconds(dtype: torch.dtype, device: torch.device, n: int = 512, reps: int = 4) -> float:
    """Seconds of one (n × 4n) @ (4n × n) matmul in `dtype` on `device`, the best of `reps` after a warm-up."""
    a = torch.randn(n, 4 * n, device=device).to(dtype)
    b = torch.randn(4 * n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first is the warm-up
            best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=None)
def bf16_speedup(device: torch.device) -> float:
    """How much faster a matmul runs in bfloat16 than in float32 on `device` (measured once per process; 0 where
    the device has no bfloat16)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return 0.0
    try:
        return _matmul_seconds(torch.float32, device) / _matmul_seconds(torch.bfloat16, device)
    except RuntimeError:  # a backend without bfloat16 matmuls
        return 0.0


def judge_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype `--judge-dtype name` means on `device`."""
    if name not in JUDGE_DTYPES:
        raise KvconvertError(f"--judge-dtype must be one of {', '.join(JUDGE_DTYPES)}; got {name}")
    if name == "float32":
        return torch.float32
    if name == "bfloat16" or bf16_speedup(device) >= BF16_MIN_SPEEDUP:
        return torch.bfloat16
    return torch.float32


def forwards_in(dtype: torch.dtype, device: torch.device):
    """A context in which the forwards run in `dtype`: autocast for bfloat16, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
