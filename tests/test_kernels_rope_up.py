"""Rope keys rebuilt from the latent inside the decode kernel (`kernels.RopeUp`, the default plan's decode): the
reference against a by-hand rotation and against the rope stream it replaces, and the Triton kernel against the
reference under the interpreter (marked `interpreter`, run in a child process by tests/test_kernels_interpreter.py)
and compiled on CUDA (`gpu`).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from kvconvert.cache_layout import Stream
from kvconvert.kernels.reference import RopeUp, dequantize_streams, latent_decode_ref, rope_up_keys

from kernel_cases import (decode_module, filled_stream, gpu, interpreter, needs_cuda, ring_of, rope_queries, tiered,
                          to_device)

# name: (B, H, R, bits, group, tail (width, bits, group) or None, rope heads, rope head dim, bias, window, splits, T,
#        scaling, policy positions and log-weights)
CASES = {
    # the default 2% plan's shape, small: 4-bit head and 2-bit tail, one rope head per kv head (3 of 9 query heads)
    "2pct": (3, 9, 32, 4, 16, (64, 2, 16), 3, 16, False, None, 3, 129, 1.0, False),
    # a 16-bit latent, a key bias (Qwen2), one rope head, a window, an attention scaling (YaRN-style)
    "b16-bias-w5": (3, 3, 24, 16, 1, None, 1, 32, True, 5, 2, 65, 1.2, False),
    # a cache policy: each slot rotates at its (fractional, merged) position, far apart (angles to 58k rad: every
    # quadrant of the kernel's sine and cosine) and different in every row, log-weights per slot
    "policy": (2, 9, 64, 8, 32, None, 3, 8, False, None, 4, 129, 1.0, True),
    # groups of 12 padded to 16 tile columns, 6 frequency pairs padded to 16, one split
    "g12-one-split": (2, 3, 36, 4, 12, (24, 2, 12), 1, 12, True, None, 1, 40, 1.0, False),
}


def build(name: str, dtype=torch.float32):
    """(kwargs of latent_decode_ref and _latent_decode) for a case: ragged rows; rope_up rows and frequencies at the
    scale of a real model's (frequencies up to 1 rad per position)."""
    B, H, R, bits, group, tail_cfg, Hr, Dr, bias, window, splits, T, scaling, policy = CASES[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    lens = [max(1, T if b == 0 else T // (2 * b + 1) + b) for b in range(B)]
    S = T + 7
    latent = filled_stream(B, S, R, bits, group, lens, gen)
    tail = filled_stream(B, S, *tail_cfg, lens, gen, spread=0.3) if tail_cfg else None
    width = R + (tail.width if tail is not None else 0)
    Wr = Hr * Dr
    positions = None
    log_w = None
    if policy:  # a policy's slots: positions out of order, some fractional (merged slots)
        positions = torch.stack([457 * torch.randperm(S, generator=gen).float() for _ in range(B)])  # up to 58k,
        positions += 0.5 * torch.rand(B, S, generator=gen)  # each row its own
        log_w = torch.log(torch.randint(1, 9, (B, S), generator=gen).float())
    rope_up = RopeUp(torch.randn(Wr, width, generator=gen) / math.sqrt(width),
                     torch.randn(Wr, generator=gen) if bias else None,
                     10000.0 ** -((torch.arange(Wr // 2) % (Dr // 2)).float() / (Dr // 2)),
                     scaling, positions)
    return dict(q_lat=torch.randn(B, H, width, generator=gen).to(dtype),
                q_rope=rope_queries(B, H, Hr, Dr, gen).to(dtype), latent=latent, rope=None,
                seq_lens=torch.tensor(lens, dtype=torch.int32), softmax_scale=1 / math.sqrt(width + Dr),
                window=window, log_weights=log_w, tail=tail, rope_up=rope_up), splits


def reference(kw):
    return latent_decode_ref(**kw)


def test_rope_up_keys_rotate_each_pair_at_the_slots_position():
    """rope_up_keys, by hand: k = W c + b, pair j = (k_2j, k_2j+1) rotated by scaling · (cos, sin)(p θ_j), p the
    position the slot holds (a wrapped ring's slot s: the last p < n with p % capacity == s)."""
    gen = torch.Generator().manual_seed(3)
    B, S, R, Wr, cap = 2, 10, 6, 8, 10
    c = torch.randn(B, S, R, generator=gen, dtype=torch.float64)
    ru = RopeUp(torch.randn(Wr, R, generator=gen, dtype=torch.float64), torch.randn(Wr, generator=gen, dtype=torch.float64),
                torch.rand(Wr // 2, generator=gen), 1.3)
    seq_lens = torch.tensor([7, 23], dtype=torch.int32)  # row 1 wrapped twice: slot s holds 20 + s (s < 3), else 10 + s
    got = rope_up_keys(ru, c, seq_lens, cap)
    for b, n in enumerate(seq_lens.tolist()):
        for s in range(S):
            p = max(q for q in range(n + cap) if q % cap == s and q < n) if s < n else s - cap
            k = ru.weight @ c[b, s] + ru.bias
            for j in range(Wr // 2):
                a = p * float(ru.freq[j])
                re = ru.scaling * (k[2 * j] * math.cos(a) - k[2 * j + 1] * math.sin(a))
                im = ru.scaling * (k[2 * j] * math.sin(a) + k[2 * j + 1] * math.cos(a))
                assert abs(got[b, s, 2 * j] - re) < 1e-9 and abs(got[b, s, 2 * j + 1] - im) < 1e-9, (b, s, j)
    # a policy's positions replace the slots' own
    pos = torch.rand(B, S, generator=gen) * 50
    moved = rope_up_keys(RopeUp(ru.weight, ru.bias, ru.freq, ru.scaling, pos), c, seq_lens, cap)
    a = pos[1, 4].double() * ru.freq[0].double()
    k = ru.weight @ c[1, 4] + ru.bias
    assert abs(moved[1, 4, 0] - 1.3 * (k[0] * torch.cos(a) - k[1] * torch.sin(a))) < 1e-9


@pytest.mark.parametrize("name", list(CASES))
def test_reference_rebuilt_keys_equal_the_rope_stream_they_replace(name):
    """The reference with rope_up is the reference reading a 16-bit-tagged fp32 rope stream of the same keys
    (what the CPU runtime hands it): equal to the last bit."""
    kw, _ = build(name)
    S = kw["latent"].data.shape[1]
    c = dequantize_streams([s for s in (kw["latent"], kw["tail"]) if s is not None], S, torch.float32)
    keys = rope_up_keys(kw["rope_up"], c, kw["seq_lens"], S)
    stream = kw | dict(rope=Stream(keys, None, 16, 1, keys.shape[-1]), rope_up=None)
    assert torch.equal(reference(kw), reference(stream))


def check_kernel(name: str, device, dtype=torch.float32, block_t=None, tol=1e-5):
    kw, splits = build(name, dtype)
    # fp32: the fp32 reference (the same fp32 angles; at 58k rad their rounding alone moves the output by 1e-5);
    # 16-bit queries: the fp64 ground truth of the same values
    ref = reference(kw if dtype == torch.float32 else build(name, torch.float64)[0]).double()

    def dev(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, Stream):
            return to_device(v, device)
        if isinstance(v, RopeUp):
            return RopeUp(*(dev(getattr(v, f)) for f in ("weight", "bias", "freq", "scaling", "positions")))
        return v

    out = decode_module()._latent_decode(**{k: dev(v) for k, v in kw.items()}, num_splits=splits, block_t=block_t)
    assert out.dtype == dtype and out.shape == ref.shape
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item() + 1e-6, err
    # the rope keys matter: without them the output moves far past the tolerance
    without = reference(build(name, torch.float64)[0] | dict(q_rope=None, rope_up=None))
    assert (without - ref).abs().max() > 10 * tol * ref.abs().max()


# Slow: "policy" at 16 positions per tile (its default-tile run stays in the default tier)
@interpreter
@pytest.mark.parametrize("name,block_t", tiered(
    [(n, None) for n in CASES] + [("2pct", 16), ("policy", 16)], {"policy-16"},
    id=lambda v: f"{v[0]}-{v[1] or 'default'}", unpack=True))
def test_rope_up_kernel_interpreter(name, block_t):
    check_kernel(name, "cpu", block_t=block_t)


@interpreter
def test_rope_up_kernel_ring():
    """A wrapped ring rotates each slot at the position it holds, computed in the kernel from the row's length: the
    same output as the unwrapped cache (rows wrapped once, three times, not at all)."""
    kw, _ = build("2pct")
    lens, cap = [150, 20, 3 * 37 + 5], 37
    gen = torch.Generator().manual_seed(21)
    B, L = 3, max(lens)
    linear = filled_stream(B, L, 32, 4, 16, lens, gen)
    tail = filled_stream(B, L, 64, 2, 16, lens, gen, spread=0.3)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    common = dict(q_lat=kw["q_lat"], q_rope=kw["q_rope"], rope=None, seq_lens=seq_lens, softmax_scale=0.1, window=21,
                  rope_up=kw["rope_up"])
    want = latent_decode_ref(latent=linear, tail=tail, **common)
    ring = dict(latent=ring_of(linear, lens, cap), tail=ring_of(tail, lens, cap))
    assert (latent_decode_ref(**ring, **common) - want).abs().max() <= 1e-5 * want.abs().max()
    out = decode_module()._latent_decode(**ring, **common, num_splits=2, block_t=16)
    assert (out - want).abs().max() <= 1e-5 * want.abs().max()


@interpreter
def test_rope_up_kernel_fp16():
    """fp16 queries: the rebuilt keys pass through 16-bit dot operands; within 2% of the fp64 output."""
    check_kernel("2pct", "cpu", torch.float16, tol=2e-2)


def test_rope_up_input_checks():
    kw, _ = build("2pct")
    ru = kw["rope_up"]
    bad = [dict(q_rope=kw["q_rope"][..., :-2]),  # queries narrower than the rope keys
           dict(rope_up=RopeUp(ru.weight[:, :-1], ru.bias, ru.freq, 1.0)),  # rope_up not over the whole latent
           dict(rope_up=RopeUp(ru.weight, ru.bias, ru.freq[:-1], 1.0)),  # a frequency per pair
           dict(rope_up=RopeUp(ru.weight, torch.zeros(2 * ru.width)[::2], ru.freq, 1.0)),  # a strided bias
           dict(rope_up=RopeUp(ru.weight, ru.bias, ru.freq, 1.0, torch.zeros(3, 5)))]  # a position per slot
    for change in bad:
        with pytest.raises(ValueError, match="rope keys from the latent"):
            decode_module()._latent_decode(**(kw | change), num_splits=1)


# ---------------------------------------------------------------------------------------------- CUDA
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_rope_up_kernel_cuda(name, dtype, tol):
    """Compiled: tf32/bf16 dots and the GPU's sine and cosine (range-reduced in the kernel)."""
    check_kernel(name, "cuda", dtype, tol=tol)
