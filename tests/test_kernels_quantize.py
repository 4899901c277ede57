"""Quantize-append (kvconvert/kernels/quantize.py) against the PyTorch reference: exact equality of codes and scales,
under the Triton interpreter (tests marked `interpreter`, run in a child process by tests/test_kernels_interpreter.py)
and compiled on CUDA (`gpu`); the reference's own ring writes and joint head + tail appends.
"""

from __future__ import annotations

import pytest
import torch

from kvconvert.cache_layout import Stream
from kvconvert.kernels.reference import (dequantize_stream, dequantize_streams, quantize_append_ref,
                                        quantize_append_streams_ref)

from kernel_cases import INTERPRETER, empty_stream, gpu, interpreter, needs_cuda, quantize_module, tiered, to_device


# (bits, W, group, T, x dtype)
QUANT_CASES = [
    (16, 24, 8, 1, torch.float32),
    (16, 21, 1, 5, torch.float16),
    (16, 96, 32, 5, torch.float32),
    (8, 24, 8, 5, torch.float32),
    (8, 24, 8, 1, torch.float16),
    (8, 21, 7, 5, torch.float32),
    (8, 96, 32, 1, torch.float32),
    (8, 64, 64, 5, torch.float16),
    (4, 24, 8, 5, torch.float16),
    (4, 24, 8, 1, torch.float32),
    (4, 96, 32, 5, torch.float32),
    (4, 64, 64, 1, torch.float16),
    (4, 64, 64, 5, torch.float32),
    (2, 24, 8, 5, torch.float16),
    (2, 24, 12, 1, torch.float32),
    (2, 160, 32, 5, torch.float32),
    (2, 64, 64, 5, torch.float32),
]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:  # bitwise, NaN-safe
        view = {2: torch.int16, 4: torch.int32}[a.element_size()]
        return torch.equal(a.view(view), b.view(view))
    return torch.equal(a, b)


def check_quantize(bits, W, group, T, dtype, device, x=None, dtype16=torch.float16):
    gen = torch.Generator().manual_seed(bits * 1000 + W * 10 + T)
    B, S = 3, 19
    stream = empty_stream(B, S, W, bits, group, dtype16)
    if bits >= 16:
        stream.data.copy_(torch.randn(stream.data.shape, generator=gen).to(dtype16))
    else:
        stream.data.copy_(torch.randint(0, 256, stream.data.shape, generator=gen, dtype=torch.uint8))
        stream.scales.copy_(torch.randn(stream.scales.shape, generator=gen).half())
    before = Stream(stream.data.clone(), None if stream.scales is None else stream.scales.clone(), bits, group, W)
    if x is None:
        x = (3 * torch.randn(B, T, W, generator=gen) + torch.randn(B, 1, W, generator=gen)).to(dtype)
    start = torch.tensor([0, 7, S - T], dtype=torch.int32)[:B]

    quantize_append_ref(stream, x, start)  # the expected cache (CPU: bit-identical to kvconvert.quant.quantize)
    got = to_device(before, device)
    quantize_module().quantize_append_triton(got, x.to(device), start.to(device))
    got = to_device(got, "cpu")

    assert _same_bits(got.data, stream.data)
    if bits < 16:
        assert _same_bits(got.scales, stream.scales)
    written = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        written[b, int(start[b]) : int(start[b]) + T] = True
    assert _same_bits(got.data[~written], before.data[~written])  # nothing else touched
    if bits < 16:
        assert _same_bits(got.scales[~written], before.scales[~written])


def check_quantize_wraps(bits: int, device) -> None:
    """Tokens written past the capacity wrap around to slot 0 (a sliding-window group's ring), bit for bit what
    the same tokens give in a larger cache at their positions."""
    gen = torch.Generator().manual_seed(bits)
    B, S, W, group, T = 2, 11, 32, 16, 7
    x = torch.randn(B, T, W, generator=gen)
    start = torch.tensor([8, 25], dtype=torch.int32)  # row 0 wraps inside the write; row 1 starts wrapped
    big = empty_stream(B, 40, W, bits, group)
    quantize_append_ref(big, x, start)
    ring = to_device(empty_stream(B, S, W, bits, group), device)
    if device == "cpu" and not INTERPRETER:
        quantize_append_ref(ring, x, start)
    else:
        quantize_module().quantize_append_triton(ring, x.to(device), start.to(device))
    ring = to_device(ring, "cpu")
    for b in range(B):
        for t in range(T):
            p = int(start[b]) + t
            assert _same_bits(ring.data[b, p % S], big.data[b, p])
            if bits < 16:
                assert _same_bits(ring.scales[b, p % S], big.scales[b, p])
    with pytest.raises(ValueError, match="do not fit"):
        quantize_append_ref(empty_stream(B, 5, W, bits, group), x, start)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantize_append_wraps_reference(bits):
    check_quantize_wraps(bits, "cpu")


@pytest.mark.parametrize("segments", [[(16, 4), (32, 2)], [(32, 8), (16, 4)], [(16, 4), (16, 16)], [(48, 2)]],
                         ids=["4+2", "8+4", "4+16", "2"])
def test_quantize_append_streams_equals_one_append_per_stream(segments):
    """A latent's head and tail appended in one pass (the reference's decode path) store bit for bit what one
    append per stream stores: ragged starts, a wrapping ring and mixed storage (16-bit: one append each)."""
    gen = torch.Generator().manual_seed(len(segments) * 10 + segments[0][1])
    B, S, T, group = 3, 11, 4, 16
    x = torch.randn(B, T, sum(w for w, _ in segments), generator=gen)
    start = torch.tensor([0, 5, 9], dtype=torch.int32)  # row 2 wraps around the ring
    joint = [empty_stream(B, S, w, bits, group) for w, bits in segments]
    apart = [empty_stream(B, S, w, bits, group) for w, bits in segments]
    quantize_append_streams_ref(joint, x, start)
    lo = 0
    for stream, (w, _) in zip(apart, segments):
        quantize_append_ref(stream, x[..., lo : lo + w], start)
        lo += w
    for a, b in zip(joint, apart):
        assert _same_bits(a.data, b.data)
        assert a.scales is None or torch.equal(a.scales, b.scales)
    together = dequantize_streams(joint, S, torch.float32)
    assert torch.equal(together, torch.cat([dequantize_stream(s, S, torch.float32) for s in apart], -1))


@interpreter
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantize_append_wraps_interpreter(bits):
    check_quantize_wraps(bits, "cpu")


# The default tier: one case per bits x dtype, with groups of 1, 7, 8, 12, 32 and 64 and writes of 1 and 5 tokens
QUANT_DEFAULT = {"b16-w24-g8-t1-float32", "b16-w21-g1-t5-float16", "b8-w21-g7-t5-float32", "b8-w64-g64-t5-float16",
                 "b4-w96-g32-t5-float32", "b4-w24-g8-t5-float16", "b2-w24-g12-t1-float32", "b2-w24-g8-t5-float16"}


def quant_id(case) -> str:
    return f"b{case[0]}-w{case[1]}-g{case[2]}-t{case[3]}-{str(case[4])[6:]}"


@interpreter
@pytest.mark.parametrize("bits,W,group,T,dtype", tiered(QUANT_CASES, {quant_id(c) for c in QUANT_CASES} - QUANT_DEFAULT,
                                                        id=quant_id, unpack=True))
def test_quantize_append_interpreter(bits, W, group, T, dtype):
    check_quantize(bits, W, group, T, dtype, "cpu")


@interpreter
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_append_edge_values(bits):
    """Ties round half to even; constant groups (fp16 scale underflows to 0: 0/0) and huge ranges match too."""
    qmax = (1 << bits) - 1
    ties = torch.tensor([0.0, qmax * 0.25, 0.625, 0.875, 0.125, 0.375, 1.125, 2.0])  # scale 0.25: k + 0.5 codes
    x = torch.stack([
        ties,
        torch.zeros(8),
        torch.full((8,), 0.1),  # not an fp16 value: zero rounds up, scale clamps to 1e-8 -> fp16 0
        torch.full((8,), -3.0),
        torch.tensor([-6e4, 6e4, 0, 1, -1, 3e4, 1e-3, -2.5]),
        torch.tensor([1e-6, 2e-6, 3e-6, 0, 1e-7, 5e-7, 2.5e-6, 4e-6]),  # fp16 subnormal scales
    ]).reshape(1, 1, 48).expand(3, 1, 48).contiguous()
    check_quantize(bits, 48, 8, 1, torch.float32, "cpu", x=x)


def tie_values(bits: int, T: int = 2, W: int = 128, group: int = 8) -> torch.Tensor:
    """(3, T, W): each group is 0, qmax*s and (k + 0.5)*s with s a random fp16 scale: exact ties in IEEE division
    (round half to even decides), which a division by reciprocal or round-half-up gets wrong for some groups."""
    gen = torch.Generator().manual_seed(bits)
    qmax = (1 << bits) - 1
    s = (torch.rand(3, T, W // group, 1, generator=gen) * 0.99 + 0.01).half().float()
    k = torch.randint(0, qmax, (3, T, W // group, group - 2), generator=gen).float()
    x = torch.cat([torch.zeros_like(s), qmax * s, (k + 0.5) * s], dim=-1)
    return x.reshape(3, T, W)


@interpreter
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_append_ties_round_half_even(bits):
    check_quantize(bits, 128, 8, 2, torch.float32, "cpu", x=tie_values(bits))


@interpreter
def test_quantize_append_16_bit_storage_fp16():
    check_quantize(16, 24, 8, 5, torch.float32, "cpu", dtype16=torch.float16)


# ---------------------------------------------------------------------------------------------- CUDA
@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantize_append_wraps_cuda(bits):
    check_quantize_wraps(bits, "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bits,W,group,T", [c[:4] for c in QUANT_CASES])
def test_quantize_append_cuda(bits, W, group, T, dtype):
    # The expected cache is computed on CPU: torch on CUDA divides by the Python scalar qmax as a multiplication
    # by its reciprocal, which can move a scale by one fp16 ulp; the kernel divides exactly, like torch on CPU.
    check_quantize(bits, W, group, T, dtype, "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_append_edge_values_cuda(bits):
    qmax = (1 << bits) - 1
    x = torch.tensor([0.0, qmax * 0.25, 0.625, 0.875, 0.125, 0.375, 1.125, 2.0] + [0.0] * 8 + [0.1] * 8)
    check_quantize(bits, 24, 8, 1, torch.float32, "cuda", x=x.reshape(1, 1, 24).expand(3, 1, 24).contiguous())


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_append_ties_round_half_even_cuda(bits):
    check_quantize(bits, 128, 8, 2, torch.float32, "cuda", x=tie_values(bits))


@gpu
@needs_cuda
def test_quantize_append_16_bit_storage_bf16_cuda():
    # The interpreter rounds fp32 -> bf16 toward zero; torch and compiled Triton round to nearest even.
    check_quantize(16, 24, 8, 5, torch.float32, "cuda", dtype16=torch.bfloat16)

