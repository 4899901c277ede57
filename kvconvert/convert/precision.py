"""The precision of a conversion's forwards that only sample or measure: the source writing its calibration text and
the planner's judge (held-out and recall-probe KLs of the source and each judged plan).

Those forwards are most of a conversion's time on a CPU (docs/results.md, "Conversion time"), and on hardware with
native bfloat16 matmuls (GPUs from Ampere on, CPUs with AVX512-BF16 or AMX) they run about twice as fast under
bfloat16 autocast. What the fits are made of stays exact: the calibration statistics' forward runs in float32 and the
moments and fits in float64, and the logit check before export compares float32 against float32. "auto" takes
bfloat16 where the hardware has native bfloat16 matmuls (a CPU without them emulates bfloat16, slower than float32).
The choice is read from the hardware, not timed, so that one machine always samples the same calibration text.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import KvconvertError

JUDGE_DTYPES = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: compute capability 8.0 or above on CUDA, AVX512-BF16
    or AMX on a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":  # torch.cpu's own probes (private; absent ones read as no)
        probes = (getattr(torch.cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe() for probe in probes)
    return False


def check_judge_dtype(name: str) -> None:
    """Refuse a --judge-dtype that is none of JUDGE_DTYPES."""
    if name not in JUDGE_DTYPES:
        raise KvconvertError(f"--judge-dtype must be one of {', '.join(JUDGE_DTYPES)}; got {name}")


def judge_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype `--judge-dtype name` means on `device`."""
    check_judge_dtype(name)
    if name == "bfloat16" or (name == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def forwards_in(dtype: torch.dtype, device: torch.device):
    """A context in which the forwards on `device` run in `dtype`: bfloat16 autocast, or autocast off (float32, even
    inside an enclosing autocast)."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
