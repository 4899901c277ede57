"""Cases and cache builders shared by the kernel tests (tests/test_kernels_*.py), and the decode tolerance.

The kernels run on CPU under the Triton interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is
first imported: tests marked `interpreter` run in a child process (tests/test_kernels_interpreter.py). On CUDA
(`@pytest.mark.gpu`, skipped without CUDA or under the interpreter) the compiled kernels run the same checks.

Decode tolerance, flash-attention style: fp32 queries match the fp32 reference tightly; for fp16, the kernel's
error against an fp64 reference is at most twice the error of an eager fp16 computation plus a small atol.
Quantize-append is lossless with respect to the reference: exact equality of codes and scales.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from kvconvert.cache_layout import Stream
from kvconvert.kernels.reference import dequantize_stream, latent_decode_ref, quantize_append_ref

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # set before this process imported triton
HAS_CUDA = torch.cuda.is_available()

interpreter = pytest.mark.interpreter  # conftest deselects these unless TRITON_INTERPRET=1 (they run in the child)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRETER, reason="needs CUDA (and compiled, not interpreted, Triton)")
slow = pytest.mark.slow


def decode_module():
    return importlib.import_module("kvconvert.kernels.decode_attention")


def quantize_module():
    return importlib.import_module("kvconvert.kernels.quantize")


# ---------------------------------------------------------------------------------------------- cache builders
def empty_stream(B: int, S: int, W: int, bits: int, group: int, dtype16=torch.float16, device="cpu") -> Stream:
    if bits >= 16:
        return Stream(torch.zeros(B, S, W, dtype=dtype16, device=device), None, 16, group, W)
    data = torch.zeros(B, S, W * bits // 8, dtype=torch.uint8, device=device)
    scales = torch.zeros(B, S, W // group, 2, dtype=torch.float16, device=device)
    return Stream(data, scales, bits, group, W)


def filled_stream(B, S, W, bits, group, lens, gen, dtype16=torch.float16, spread=1.0) -> Stream:
    """A stream whose positions < lens[b] hold quantized random values; [lens[b], max(lens)) hold finite garbage
    (read by the reference, masked by it) and positions >= max(lens) hold NaN where the layout allows it, random
    bytes elsewhere: a kernel that reads past a row's length gets a wrong or NaN answer."""
    stream = empty_stream(B, S, W, bits, group, dtype16)
    x = torch.randn(B, S, W, generator=gen) * spread + 0.3 * torch.randn(B, 1, W, generator=gen)
    quantize_append_ref(stream, x, torch.zeros(B, dtype=torch.int32))
    top = max(lens)
    for b, n in enumerate(lens):
        if bits >= 16:
            stream.data[b, n:top] = (1e3 * torch.randn(top - n, W, generator=gen)).to(dtype16)
            stream.data[b, top:] = float("nan")
        else:
            stream.data[b, n:] = torch.randint(0, 256, stream.data[b, n:].shape, generator=gen, dtype=torch.uint8)
            stream.scales[b, n:top] = (10 * torch.rand(stream.scales[b, n:top].shape, generator=gen)).half()
            stream.scales[b, top:] = float("nan")
    return stream


def to_device(stream: Stream | None, device) -> Stream | None:
    if stream is None:
        return None
    scales = None if stream.scales is None else stream.scales.to(device)
    return Stream(stream.data.to(device), scales, stream.bits, stream.group, stream.width)


def rope_queries(B, H, rope_heads, dr, gen) -> torch.Tensor:
    """q_rope laid out over the whole rope stream (B, H, rope_heads * dr): zero outside head h's rope head."""
    q = torch.zeros(B, H, rope_heads * dr)
    per = H // rope_heads
    for h in range(H):
        j = h // per
        q[:, h, j * dr : (j + 1) * dr] = torch.randn(B, dr, generator=gen)
    return q


def ring_of(linear: Stream, lens: list[int], cap: int) -> Stream:
    """The ring of `cap` slots a sliding-window group keeps of `linear` (token p at slot p), token p at slot
    p % cap for the last `cap` tokens of each row; the other slots hold garbage."""
    gen = torch.Generator().manual_seed(cap)
    B = linear.data.shape[0]
    data = torch.randint(0, 256, (B, cap, *linear.data.shape[2:]), generator=gen, dtype=torch.uint8)
    data = data if linear.bits < 16 else (1e3 * torch.randn(data.shape, generator=gen)).to(linear.data.dtype)
    scales = None if linear.scales is None else (10 * torch.rand(B, cap, *linear.scales.shape[2:], generator=gen)).half()
    for b, n in enumerate(lens):
        for p in range(max(0, n - cap), n):
            data[b, p % cap] = linear.data[b, p]
            if scales is not None:
                scales[b, p % cap] = linear.scales[b, p]
    return Stream(data, scales, linear.bits, linear.group, linear.width)


# ---------------------------------------------------------------------------------------------- decode cases
# (name, B, H, R, lat_bits, lat_group, rope (rope_heads "1"/"H", dr, bits, group) or None, q_lat?, window, splits, T
#  [, tail (width, bits, group)])
# T: the longest row; batch rows are ragged (T, T // 3 + 1, 1, ...). R: the latent's head when it has a tail.
DECODE_CASES = [
    ("h1-t1-b16", 1, 1, 64, 16, 1, None, True, None, 1, 1),
    ("h3-t17-b8", 3, 3, 96, 8, 32, ("1", 32, 16, 1), True, None, 3, 17),
    ("h9-t129-b4", 3, 9, 64, 4, 16, ("H", 8, 16, 1), True, None, 4, 129),
    ("h9-t129-b4-w5", 3, 9, 64, 4, 16, ("H", 8, 16, 1), True, 5, 4, 129),
    ("h3-t17-b16-odd", 3, 3, 21, 16, 1, ("1", 8, 16, 1), True, None, 2, 17),
    ("h9-t17-b8-odd", 1, 9, 25, 8, 5, None, True, 5, 1, 17),
    ("h1-t129-b4-r24", 3, 1, 24, 4, 8, ("1", 32, 8, 16), True, None, 3, 129),
    # 4-bit groups of 12 values (and a 4-bit rope key of groups of 6): each group padded to 16 (8) tile columns
    ("h9-t129-b4-g12", 3, 9, 36, 4, 12, ("1", 12, 4, 6), True, None, 3, 129),
    ("h3-t129-nolat", 3, 3, 96, 8, 32, ("H", 8, 4, 8), False, None, 5, 129),
    ("h9-t17-nolat-w5", 1, 9, 64, 16, 1, ("1", 32, 16, 1), False, 5, 2, 17),
    ("h9-t129-r192-split1", 3, 9, 192, 16, 1, None, True, None, 1, 129),  # identity-like width, one split
    ("h9-t129-wide-rope", 3, 9, 24, 8, 24, ("H", 32, 8, 32), True, 5, 3, 129),  # rope width 288, 8-bit rope
    ("h65-t17-head-blocks", 3, 65, 24, 4, 8, ("1", 8, 16, 1), True, None, 2, 17),  # two head blocks of 64
    ("h3-t1000-b4", 3, 3, 96, 4, 32, ("1", 32, 16, 1), True, None, 4, 1000),
    ("h9-t1000-b8-w5", 1, 9, 64, 8, 64, ("H", 8, 16, 1), True, 5, 7, 1000),
    ("h9-t129-b2", 3, 9, 64, 2, 16, ("1", 16, 2, 16), True, None, 4, 129),  # 2-bit latent and rope key
    # a latent with a low-precision tail (a second stream; the 0.25 plan's shape: 96 @ 4 + 160 @ 2, rope 64 @ 8)
    ("h9-t129-tail2", 3, 9, 32, 4, 16, ("H", 8, 16, 1), True, None, 4, 129, (64, 2, 16)),
    ("h3-t1000-tail2", 3, 3, 96, 4, 32, ("1", 64, 8, 32), True, None, 4, 1000, (160, 2, 32)),
    ("h9-t129-tail2-g12-w5", 3, 9, 24, 4, 12, ("1", 12, 4, 6), True, 5, 3, 129, (36, 2, 12)),
    ("h3-t17-b16-tail4", 3, 3, 32, 16, 1, None, True, None, 2, 17, (48, 4, 16)),
    ("h3-t129-nolat-tail", 3, 3, 32, 8, 32, ("H", 8, 4, 8), False, None, 5, 129, (64, 2, 32)),
    ("h3-t65-b8-tail4", 3, 3, 32, 8, 32, ("1", 32, 16, 1), True, None, 3, 65, (96, 4, 32)),  # 8-bit head, 4-bit tail
]

CASE = {c[0]: c for c in DECODE_CASES}


def build_decode_case(case, gen, with_tail=False):
    """(q_lat, q_rope, latent, rope, seq_lens, scale, window, splits[, tail])."""
    _, B, H, R, bits, group, rope_cfg, has_q_lat, window, splits, T, *tail_cfg = case
    lens = [max(1, T if b == 0 else T // (2 * b + 1) + b) for b in range(B)]
    S = T + 7  # the capacity: beyond every row's length
    latent = filled_stream(B, S, R, bits, group, lens, gen)
    tail = filled_stream(B, S, *tail_cfg[0], lens, gen, spread=0.3) if tail_cfg else None
    width = R + (tail.width if tail is not None else 0)
    q_lat = torch.randn(B, H, width, generator=gen) if has_q_lat else None
    rope = q_rope = None
    if rope_cfg is not None:
        mode, dr, rbits, rgroup = rope_cfg
        rope_heads = 1 if mode == "1" else H
        rope = filled_stream(B, S, rope_heads * dr, rbits, rgroup, lens, gen, spread=2.0)
        q_rope = rope_queries(B, H, rope_heads, dr, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 1.0 / (width + (rope_cfg[1] if rope_cfg else 0)) ** 0.5
    if tail is not None and not with_tail:
        raise ValueError(f"case {case[0]} has a tail: build it with with_tail=True")
    return (q_lat, q_rope, latent, rope, seq_lens, scale, window, splits) + ((tail,) if with_tail else ())


# ---------------------------------------------------------------------------------------------- decode tolerance
def attention_eager(q_lat, q_rope, latent, rope, seq_lens, softmax_scale, window, dtype, tail=None):
    """Naive attention with every operation in `dtype` (fp64: the ground truth; fp16: the eager error scale)."""
    S = int(seq_lens.max())
    c = dequantize_stream(latent, S, torch.float32).to(dtype)
    if tail is not None:
        c = torch.cat((c, dequantize_stream(tail, S, torch.float32).to(dtype)), -1)
    q = q_lat if q_lat is not None else q_rope
    B, H = q.shape[:2]
    scores = torch.zeros(B, H, S, dtype=dtype)
    if q_lat is not None:
        scores = scores + torch.matmul(q_lat.to(dtype), c.transpose(1, 2))
    if q_rope is not None:
        k = dequantize_stream(rope, S, torch.float32).to(dtype)
        scores = scores + torch.matmul(q_rope.to(dtype), k.transpose(1, 2))
    pos = torch.arange(S)[None, :]
    lens = seq_lens.long().cpu()[:, None]
    valid = pos < lens
    if window is not None:
        valid &= pos >= lens - window
    scores = (scores * softmax_scale).masked_fill(~valid[:, None, :], float("-inf"))
    return torch.matmul(scores.softmax(-1), c)


def assert_decode_close(out, q_lat, q_rope, latent, rope, seq_lens, scale, window, tail=None):
    """fp32: within 1e-5 of the fp32 reference; fp16/bf16: error vs fp64 <= 2 x eager same-dtype error + atol."""
    out = out.cpu()
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32:
        ref = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window, tail=tail)
        err = (out - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item() + 1e-6, err
    else:
        exact = attention_eager(q_lat, q_rope, latent, rope, seq_lens, scale, window, torch.float64, tail)
        eager = attention_eager(q_lat, q_rope, latent, rope, seq_lens, scale, window, out.dtype, tail)
        err = (out.double() - exact).abs().max().item()
        eager_err = (eager.double() - exact).abs().max().item()
        assert err <= 2 * eager_err + 1e-4 * exact.abs().max().item(), (err, eager_err)


# ---------------------------------------------------------------------------------------------- tiers
def tiered(values, slow_ids, id=str, unpack=False) -> list:
    """pytest.param for each value (its items, unpack=True), with the id id(value); those whose id is in slow_ids are
    marked `slow` (the interpreter grids' slow tier: python -m pytest -q -m slow)."""
    params = [pytest.param(*(v if unpack else (v,)), id=id(v), marks=(slow,) if id(v) in slow_ids else ())
              for v in values]
    unknown = set(slow_ids) - {p.id for p in params}
    if unknown:
        raise ValueError(f"no such case: {sorted(unknown)}")
    return params
