"""Triton kernels against the PyTorch references (kvconvert/kernels/reference.py), on awkward sizes.

CPU: the kernels run under the Triton interpreter, which must be switched on (TRITON_INTERPRET=1) before triton is
first imported: `@triton.jit` picks interpreted or compiled when a decorator runs, and triton.language's own
helpers (tl.zeros, tl.max, ...) are decorated when triton is imported. In a pytest run triton is already imported
by conftest (transformers/torch import it), and setting the variable for the whole process would also switch
`kvconvert.kernels` of every other test file onto the slow interpreter path. So the interpreter tests run in-process
only when the process was started with TRITON_INTERPRET=1; otherwise `test_interpreter_suite` runs this file again
in a child process started with TRITON_INTERPRET=1 (gpu tests deselected) and fails with the child's report.
CUDA (`@pytest.mark.gpu`, skipped without CUDA or under the interpreter): the compiled kernels.

Decode tolerance, flash-attention style: fp32 queries match the fp32 reference tightly; for fp16, the kernel's
error against an fp64 reference is at most twice the error of an eager fp16 computation plus a small atol.
Quantize-append is lossless with respect to the reference: exact equality of codes and scales.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import json
import zlib
from pathlib import Path

import pytest
import torch

from kvconvert.cache_layout import Stream
from kvconvert.kernels.reference import (
    dequantize_stream,
    dequantize_streams,
    latent_decode_ref,
    quantize_append_ref,
    quantize_append_streams_ref,
)

ROOT = Path(__file__).resolve().parents[1]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # set before this process imported triton
HAS_CUDA = torch.cuda.is_available()

interpreter = pytest.mark.interpreter  # conftest deselects these unless TRITON_INTERPRET=1 (they run in the child)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRETER, reason="needs CUDA (and compiled, not interpreted, Triton)")


def decode_module():
    return importlib.import_module("kvconvert.kernels.decode_attention")


def quantize_module():
    return importlib.import_module("kvconvert.kernels.quantize")


def test_interpreter_suite():
    """Every interpreter test of this file, in a child process started with TRITON_INTERPRET=1."""
    if INTERPRETER:
        pytest.skip("this process is the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"


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


# ---------------------------------------------------------------------------------------------- decode references
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
]

CASE = {c[0]: c for c in DECODE_CASES}
SMALL_TILE_CASES = [CASE[name] for name in ("h3-t17-b8", "h9-t129-b4-w5", "h3-t129-nolat", "h9-t129-tail2")]


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


def check_decode(case, dtype, device, block_t=None, gather=False):
    gen = torch.Generator().manual_seed(zlib.crc32(case[0].encode()))
    q_lat, q_rope, latent, rope, seq_lens, scale, window, splits, tail = build_decode_case(case, gen, with_tail=True)
    q_lat = None if q_lat is None else q_lat.to(dtype)
    q_rope = None if q_rope is None else q_rope.to(dtype)

    def dev(t):
        return None if t is None else t.to(device)

    out = decode_module()._latent_decode(
        dev(q_lat), dev(q_rope), to_device(latent, device), to_device(rope, device), seq_lens.to(device), scale,
        window, splits, block_t=block_t, gather=gather, tail=to_device(tail, device),
    )
    H = (q_lat if q_lat is not None else q_rope).shape[1]
    width = latent.width + (tail.width if tail is not None else 0)
    assert out.dtype == dtype and out.shape == (seq_lens.shape[0], H, width)
    assert_decode_close(out, q_lat, q_rope, latent, rope, seq_lens, scale, window, tail)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_latent_decode_interpreter(case, dtype):
    check_decode(case, dtype, "cpu")


@interpreter
@pytest.mark.parametrize("case", SMALL_TILE_CASES, ids=[c[0] for c in SMALL_TILE_CASES])
def test_latent_decode_small_tiles(case):
    """BLOCK_T 16: rows, windows and split chunks cross several tiles."""
    check_decode(case, torch.float32, "cpu", block_t=16)


GATHER_CASES = [CASE[name] for name in ("h9-t129-b4", "h9-t17-b8-odd", "h9-t129-b4-g12", "h3-t129-nolat", "h9-t129-b2",
                                        "h9-t129-tail2-g12-w5")]


@interpreter
@pytest.mark.parametrize("case", GATHER_CASES, ids=[c[0] for c in GATHER_CASES])
def test_latent_decode_gather_loads(case):
    """The per-value load variant that bench/kernels.py --sweep times against the default tile loads."""
    check_decode(case, torch.float32, "cpu", gather=True)


def test_tile_geometry():
    """Tile columns per stream: natural order for power-of-two groups, each group padded to a power of two
    otherwise, at least tl.dot's 16 columns."""
    geometry = decode_module()._tile_geometry
    assert geometry(4, 32, 32) == (32, 32, 1)
    assert geometry(4, 32, 192) == (32, 32, 8)  # 6 groups -> 8 slots
    assert geometry(8, 24, 24) == (24, 32, 1)
    assert geometry(4, 12, 36) == (12, 16, 4)
    assert geometry(4, 8, 8) == (8, 16, 1)
    assert geometry(16, 1, 21) == (32, 32, 1)
    assert geometry(16, 1, 8) == (16, 16, 1)
    assert geometry(2, 32, 160) == (32, 32, 8)  # 5 groups -> 8 slots
    assert geometry(2, 12, 36) == (12, 16, 4)


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


def check_ring(device) -> None:
    """A wrapped ring (a sliding-window group's cache: token p at slot p % capacity) attends like the full cache
    over the window: rows that wrapped once, several times and not at all; log-weights and key norms per slot."""
    gen = torch.Generator().manual_seed(11)
    B, H, R, window, cap, L = 4, 9, 64, 21, 37, 150
    lens = [L, 38, 20, 3 * cap + 5]  # wrapped, just wrapped, not wrapped, wrapped three times
    linear = filled_stream(B, max(lens), R, 4, 16, lens, gen)
    rope_linear = filled_stream(B, max(lens), 32, 8, 32, lens, gen, spread=2.0)
    q_lat, q_rope = torch.randn(B, H, R, generator=gen), rope_queries(B, H, 1, 32, gen)
    log_w = torch.log(torch.randint(1, 9, (B, max(lens)), generator=gen).float())
    key_scale = (0.25 + 2 * torch.rand(B, max(lens), 3, generator=gen)).half()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ring, rope_ring = ring_of(linear, lens, cap), ring_of(rope_linear, lens, cap)
    slot_of = torch.stack([torch.tensor([p % cap for p in range(max(lens))])] * B)
    ring_log_w, ring_ks = torch.zeros(B, cap), torch.zeros(B, cap, 3).half()
    for b, n in enumerate(lens):
        for p in range(max(0, n - cap), n):
            ring_log_w[b, slot_of[b, p]], ring_ks[b, slot_of[b, p]] = log_w[b, p], key_scale[b, p]
    scale = 0.1
    want = latent_decode_ref(q_lat, q_rope, linear, rope_linear, seq_lens, scale, window, log_weights=log_w,
                             key_scale=key_scale)
    ref = latent_decode_ref(q_lat, q_rope, ring, rope_ring, seq_lens, scale, window, log_weights=ring_log_w,
                            key_scale=ring_ks)
    assert (ref - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    out = decode_module()._latent_decode(q_lat.to(device), q_rope.to(device), to_device(ring, device),
                                         to_device(rope_ring, device), seq_lens.to(device), scale, window, 3,
                                         block_t=16, log_weights=ring_log_w.to(device), key_scale=ring_ks.to(device))
    assert (out.cpu() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@interpreter
def test_latent_decode_ring():
    check_ring("cpu")


def test_latent_decode_ring_reference_dequantizes_its_slots():
    """The reference's path through decode_streams reads a wrapped ring's every slot (not max(seq_lens) of them)."""
    from kvconvert.kernels import decode_streams

    gen = torch.Generator().manual_seed(12)
    lens, cap = [90, 12], 40
    linear = filled_stream(2, 90, 32, 4, 16, lens, gen)
    ring = ring_of(linear, lens, cap)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    plain, _, _ = decode_streams(ring, None, seq_lens)
    assert plain.data.shape[1] == cap
    q = torch.randn(2, 3, 32, generator=gen)
    got = latent_decode_ref(q, None, plain, None, seq_lens, 0.2, 25)
    want = latent_decode_ref(q, None, linear, None, seq_lens, 0.2, 25)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def check_log_weights(name: str, device) -> None:
    """Per-slot log-weights (a cache policy's merged slots) enter every head's scores like the reference's."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    q_lat, q_rope, latent, rope, seq_lens, scale, window, splits = build_decode_case(CASE[name], gen)
    B, S = latent.data.shape[:2]
    log_w = torch.log(torch.randint(1, 9, (B, S), generator=gen).float())

    def dev(t):
        return None if t is None else t.to(device)

    args = (dev(q_lat), dev(q_rope), to_device(latent, device), to_device(rope, device), seq_lens.to(device), scale, window, splits)
    out = decode_module()._latent_decode(*args, log_weights=log_w.to(device)).cpu()
    ref = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window, log_weights=log_w)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6
    plain = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window)
    assert (ref - plain).abs().max().item() > 1e-2 * ref.abs().max().item()  # the weights do change the output


@interpreter
@pytest.mark.parametrize("name", ["h9-t129-b4", "h3-t1000-b4", "h9-t1000-b8-w5"])
def test_latent_decode_log_weights(name):
    check_log_weights(name, "cpu")


def check_key_scale(name: str, device) -> None:
    """A qk-norm source's key norms (one per position and kv head, a strided view of a wider tensor) scale each
    head's scores by its own kv head's norm, like the reference; with log-weights too."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
    q_lat, q_rope, latent, rope, seq_lens, scale, window, splits = build_decode_case(CASE[name], gen)
    B, S = latent.data.shape[:2]
    H = (q_lat if q_lat is not None else q_rope).shape[1]
    K = 3  # H is 3 or 9: one or three query heads per kv head
    key_scale = (0.25 + 2 * torch.rand(B, S, K + 2, generator=gen)).half()[..., 1 : K + 1]
    log_w = torch.log(torch.randint(1, 9, (B, S), generator=gen).float())
    head_bias = 3 * torch.randn(B, H, generator=gen)  # a key bias under a key norm: q_nope · b_k per head

    def dev(t):
        return None if t is None else t.to(device)

    args = (dev(q_lat), dev(q_rope), to_device(latent, device), to_device(rope, device), seq_lens.to(device), scale, window, splits)
    for lw, hb in ((None, None), (log_w, None), (None, head_bias), (log_w, head_bias)):
        out = decode_module()._latent_decode(*args, log_weights=dev(lw), key_scale=dev(key_scale), head_bias=dev(hb)).cpu()
        ref = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window, log_weights=lw, key_scale=key_scale,
                                head_bias=hb)
        assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6
    # a head bias cancels in the softmax without key norms, and moves the output with them
    plain = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window)
    biased = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window, head_bias=head_bias)
    assert torch.allclose(plain, biased, atol=1e-5 * plain.abs().max().item())
    normed = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window, key_scale=key_scale)
    both = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window, key_scale=key_scale, head_bias=head_bias)
    assert (both - normed).abs().max().item() > 1e-2 * normed.abs().max().item()
    # the reference itself: head h's scores times key_scale[:, :, h // (H / K)], by hand
    per_head = key_scale.float().repeat_interleave(H // K, dim=2)
    by_hand = torch.stack([latent_decode_ref(
        None if q_lat is None else q_lat[:, h : h + 1] * 1, None if q_rope is None else q_rope[:, h : h + 1], latent,
        rope, seq_lens, scale, window, log_weights=None, key_scale=per_head[..., h : h + 1]) for h in range(H)], 1)[:, :, 0]
    assert torch.allclose(normed, by_hand, atol=1e-6)
    assert (normed - plain).abs().max().item() > 1e-2 * normed.abs().max().item()  # the norms do change the output


@interpreter
@pytest.mark.parametrize("name", ["h9-t129-b4", "h3-t1000-b4", "h9-t1000-b8-w5", "h3-t129-nolat"])
def test_latent_decode_key_scale(name):
    check_key_scale(name, "cpu")


@interpreter
def test_latent_decode_default_splits_and_public_signature():
    gen = torch.Generator().manual_seed(5)
    q_lat, q_rope, latent, rope, seq_lens, scale, window, _ = build_decode_case(CASE["h9-t129-b4"], gen)
    mod = decode_module()
    out = mod.latent_decode_triton(q_lat, q_rope, latent, rope, seq_lens, scale, window, None)
    ref = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@interpreter
@pytest.mark.parametrize("name", ["h3-t1000-b4", "h9-t1000-b8-w5"])
def test_latent_decode_merges_many_splits(name):
    """More splits than the merge kernel reads at once: 63 splits of 16 positions, so the second block of 32
    splits holds data too (and rows shorter than the capacity leave some empty)."""
    gen = torch.Generator().manual_seed(11)
    q_lat, q_rope, latent, rope, seq_lens, scale, window, _ = build_decode_case(CASE[name], gen)
    out = decode_module()._latent_decode(q_lat, q_rope, latent, rope, seq_lens, scale, window, 63, block_t=16)
    ref = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@interpreter
@pytest.mark.parametrize("splits", [1, 8])
def test_latent_decode_row_without_positions_is_zero(splits):
    """A row with nothing cached (seq_len 0) reads nothing: zeros from the one-split path and from the merge alike."""
    gen = torch.Generator().manual_seed(12)
    q_lat, q_rope, latent, rope, seq_lens, scale, window, _ = build_decode_case(CASE["h3-t17-b8"], gen)
    seq_lens = seq_lens.clone()
    seq_lens[1] = 0
    out = decode_module().latent_decode_triton(q_lat, q_rope, latent, rope, seq_lens, scale, None, splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    keep = [0, 2]
    ref = latent_decode_ref(q_lat[keep], q_rope[keep], latent.rows(keep), rope.rows(keep), seq_lens[keep], scale, None)
    torch.testing.assert_close(out[keep], ref, rtol=1e-5, atol=1e-5)


@interpreter
def test_latent_decode_rope_stream_without_rope_queries():
    """As in the reference, a rope stream without rope queries does not enter the scores."""
    gen = torch.Generator().manual_seed(8)
    q_lat, _, latent, rope, seq_lens, scale, window, splits = build_decode_case(CASE["h3-t17-b8"], gen)
    out = decode_module().latent_decode_triton(q_lat, None, latent, rope, seq_lens, scale, window, splits)
    ref = latent_decode_ref(q_lat, None, latent, rope, seq_lens, scale, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@interpreter
def test_latent_decode_reads_no_unwritten_partials(monkeypatch):
    """Empty splits write only lse = -inf; the merge must not read their (uninitialized) partial outputs."""
    gen = torch.Generator().manual_seed(9)
    q_lat, q_rope, latent, rope, seq_lens, scale, window, _ = build_decode_case(CASE["h9-t129-b4-w5"], gen)
    ref = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window)
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    out = decode_module().latent_decode_triton(q_lat, q_rope, latent, rope, seq_lens, scale, window, 8)
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@interpreter
def test_latent_decode_launcher_never_syncs(monkeypatch):
    """CUDA-graph safety: the launcher reads no tensor value on the host (the grid depends on the capacity only)."""

    def no_host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor value in the launcher")

    gen = torch.Generator().manual_seed(6)
    q_lat, q_rope, latent, rope, seq_lens, scale, window, splits = build_decode_case(CASE["h3-t17-b8"], gen)
    ref = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window)
    mod = decode_module()
    for name in ("item", "tolist", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    out = mod.latent_decode_triton(q_lat, q_rope, latent, rope, seq_lens, scale, window, splits)
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- quantize-append
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


@interpreter
@pytest.mark.parametrize("bits,W,group,T,dtype", QUANT_CASES, ids=[f"b{c[0]}-w{c[1]}-g{c[2]}-t{c[3]}-{str(c[4])[6:]}"
                                                                    for c in QUANT_CASES])
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_latent_decode_cuda(case, dtype):
    check_decode(case, dtype, "cuda")


@gpu
@needs_cuda
def test_latent_decode_ring_cuda():
    check_ring("cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_quantize_append_wraps_cuda(bits):
    check_quantize_wraps(bits, "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("case", GATHER_CASES, ids=[c[0] for c in GATHER_CASES])
def test_latent_decode_gather_loads_cuda(case):
    check_decode(case, torch.bfloat16, "cuda", gather=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["h9-t129-b4", "h3-t1000-b4"])
def test_latent_decode_log_weights_cuda(name):
    check_log_weights(name, "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("name", ["h9-t129-b4", "h3-t1000-b4", "h3-t129-nolat"])
def test_latent_decode_key_scale_cuda(name):
    check_key_scale(name, "cuda")


@gpu
@needs_cuda
def test_latent_decode_cuda_graph():
    """Captured once, replayed after the lengths change in place: the grid never depends on seq_lens."""
    gen = torch.Generator().manual_seed(7)
    q_lat, q_rope, latent, rope, seq_lens, scale, window, _ = build_decode_case(CASE["h3-t1000-b4"], gen)
    mod = decode_module()
    args = [q_lat.cuda().half(), q_rope.cuda().half(), to_device(latent, "cuda"), to_device(rope, "cuda")]
    lens = seq_lens.cuda()
    for _ in range(2):
        mod.latent_decode_triton(*args, lens, scale, window, None)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mod.latent_decode_triton(*args, lens, scale, window, None)
    for new_lens in ([1000, 3, 1], [17, 300, 150]):  # within each row's real data (build_decode_case)
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        q_lat16, q_rope16 = args[0].cpu(), args[1].cpu()
        assert_decode_close(out, q_lat16, q_rope16, latent, rope, lens.cpu(), scale, window)


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


@interpreter
@pytest.mark.parametrize("bits", [16, 4, "4+2"])
def test_runtime_through_the_interpreted_kernels(bits):
    """The whole runtime with the Triton kernels (interpreted): the model's own greedy tokens."""
    from kvconvert.runtime import LatentRuntime, SamplingOptions

    from test_runtime import FROM_LATENT, PLANS, prompt, reference_greedy, tiny_clla

    # qk_norm (4 bits): the key norms and a key bias's head term reach the kernel; rope keys from the latent reach
    # it as a 16-bit rope stream reconstructed from the dequantized cache
    plans = [(p, False) for p in PLANS.values()] + [(p, True) for p in PLANS.values() if bits == 4]
    plans += [(p | dict(rope_from_latent=True, rope_bits=16), False) for p in FROM_LATENT.values()]
    for plan, qk_norm in plans:
        model = tiny_clla(bits, qk_norm=qk_norm, **plan)
        prompts = [prompt(9, seed=1), prompt(4, seed=2)]
        out, _ = LatentRuntime(model, 2, 32).generate(prompts, SamplingOptions(max_new_tokens=8))
        assert out == [reference_greedy(model, p, 8) for p in prompts]


@interpreter
@pytest.mark.parametrize("rope", ["cached", "from latent"])
def test_policy_runtime_through_the_interpreted_kernels(rope):
    """ZSMerge's merged slots reach the Triton kernel as log-weights (and, rope keys from the latent, the rope
    stream rotated at each slot's position): the same tokens as the reference path."""
    import subprocess as sp

    from kvconvert.runtime import LatentRuntime, SamplingOptions
    from kvconvert.runtime.policies import make_policy

    from test_runtime import FROM_LATENT, prompt, tiny_clla

    kw = {} if rope == "cached" else dict(rope_from_latent=True, rope_bits=16, **FROM_LATENT["per kv head"])
    model = tiny_clla(4, **kw)
    ids = prompt(30, seed=4)
    rt = LatentRuntime(model, 1, 40, policy=make_policy("zsmerge", 12), context=64)
    out, _ = rt.generate([ids], SamplingOptions(max_new_tokens=10))
    code = (
        "import torch, json, sys; sys.path.insert(0, 'tests');"
        "from test_runtime import prompt, tiny_clla;"
        "from kvconvert.runtime import LatentRuntime, SamplingOptions;"
        "from kvconvert.runtime.policies import make_policy;"
        f"rt = LatentRuntime(tiny_clla(4, **{kw!r}), 1, 40, policy=make_policy('zsmerge', 12), context=64);"
        "print(json.dumps(rt.generate([prompt(30, seed=4)], SamplingOptions(max_new_tokens=10))[0][0]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ref = sp.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out[0] == json.loads(ref.stdout.strip().splitlines()[-1])
    assert float(rt.policy.states[0].weight[0, :12].sum()) == 39.0  # merges happened: 30 + 9 decoded tokens
