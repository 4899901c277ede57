"""The decode kernel (kvconvert/kernels/decode_attention.py) against the PyTorch reference, on awkward sizes: under
the Triton interpreter (tests marked `interpreter`, run in a child process by tests/test_kernels_interpreter.py) and
compiled on CUDA (`gpu`). Tolerances: tests/kernel_cases.py.

The interpreter grids are tiered: the default run takes every decode case once in fp32 and an fp16 subset, the slow
tier (python -m pytest -q -m slow) the rest; each slow id says which default case takes its path.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from kvconvert.kernels.reference import latent_decode_ref

from kernel_cases import (CASE, DECODE_CASES, assert_decode_close, build_decode_case, decode_module, filled_stream,
                          gpu, interpreter, needs_cuda, ring_of, rope_queries, tiered, to_device)


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


# The fp16 runs in the default tier: 2, 4, 8 and 16 bits, a tail, rope keys alone, windows, one position. The query
# dtype changes only the dot operands' dtype (DOT_DTYPE) and the store, in code every case shares.
FP16_DEFAULT = {"h1-t1-b16", "h3-t17-b8", "h9-t129-b4-w5", "h3-t17-b16-odd", "h3-t129-nolat", "h9-t17-nolat-w5",
                "h9-t129-b2", "h3-t17-b16-tail4"}
# fp32 in the slow tier: a 2-bit tail over 1000 positions; h9-t129-tail2 takes the tail, h3-t1000-b4 the long rows
FP32_SLOW = {"h3-t1000-tail2"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@interpreter
@pytest.mark.parametrize("case,dtype", [
    pytest.param(case, DTYPES[d], id=f"{case[0]}-{d}", marks=(
        (pytest.mark.slow,) if case[0] in (FP32_SLOW if d == "fp32" else CASE.keys() - FP16_DEFAULT) else ()))
    for case in DECODE_CASES for d in DTYPES])
def test_latent_decode_interpreter(case, dtype):
    check_decode(case, dtype, "cpu")


SMALL_TILE_CASES = [CASE[name] for name in ("h3-t17-b8", "h9-t129-b4-w5", "h3-t129-nolat", "h9-t129-tail2")]


# Slow: h3-t17-b8's rows and h3-t129-nolat's rope-only scores cross tiles as h9-t129-b4-w5's and h9-t129-tail2's do
@interpreter
@pytest.mark.parametrize("case", tiered(SMALL_TILE_CASES, {"h3-t17-b8", "h3-t129-nolat"}, id=lambda c: c[0]))
def test_latent_decode_small_tiles(case):
    """BLOCK_T 16: rows, windows and split chunks cross several tiles."""
    check_decode(case, torch.float32, "cpu", block_t=16)


GATHER_CASES = [CASE[name] for name in ("h9-t129-b4", "h9-t17-b8-odd", "h9-t129-b4-g12", "h3-t129-nolat", "h9-t129-b2",
                                        "h9-t129-tail2-g12-w5")]


# Slow: h9-t129-b4's 4-bit groups of 16 load like h3-t129-nolat's 4-bit rope groups of 8; h9-t129-b4-g12's padded
# groups of 12 are h9-t129-tail2-g12-w5's head
@interpreter
@pytest.mark.parametrize("case", tiered(GATHER_CASES, {"h9-t129-b4", "h9-t129-b4-g12"}, id=lambda c: c[0]))
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


# Slow: the 1000-position rows; h9-t129-b4 takes the same path over several tiles per split
@interpreter
@pytest.mark.parametrize("name", tiered(["h9-t129-b4", "h3-t1000-b4", "h9-t1000-b8-w5"], {"h3-t1000-b4"}))
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


# Slow: the 1000-position rows; h9-t129-b4 takes the same path over several tiles per split
@interpreter
@pytest.mark.parametrize("name", tiered(["h9-t129-b4", "h3-t1000-b4", "h9-t1000-b8-w5", "h3-t129-nolat"],
                                        {"h3-t1000-b4"}))
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
@pytest.mark.parametrize("splits", [None, pytest.param(8, marks=pytest.mark.slow)])  # 8: the same path, slow tier
def test_latent_decode_grid_by_filled_length(monkeypatch, splits):
    """`filled` (a bound on every row's length) sizes the grid by the filled slots: the splits cover 256 slots of a
    1,024-slot cache (whose slots past the rows hold NaN garbage) and the output is the reference's."""
    gen = torch.Generator().manual_seed(13)
    q_lat, q_rope, latent, rope, seq_lens, scale, window, _ = build_decode_case(CASE["h9-t129-b4"], gen)

    def widen(s, cap=1024):  # the same stream in a larger cache: NaN scales (16-bit: NaN values) past its slots
        data = torch.cat([s.data, torch.randint(0, 256, (s.data.shape[0], cap - s.data.shape[1], *s.data.shape[2:]),
                                                generator=gen, dtype=torch.uint8).to(s.data.dtype)], 1)
        scales = None if s.scales is None else torch.cat(
            [s.scales, torch.full((s.scales.shape[0], cap - s.scales.shape[1], *s.scales.shape[2:]), float("nan"),
                                  dtype=s.scales.dtype)], 1)
        if s.bits >= 16:
            data[:, s.data.shape[1]:] = float("nan")
        return type(s)(data, scales, s.bits, s.group, s.width)

    mod = decode_module()
    spans, launch = [], mod._launch_config
    monkeypatch.setattr(mod, "_launch_config", lambda B, H, S, *a: spans.append(S) or launch(B, H, S, *a))
    out = mod.latent_decode_triton(q_lat, q_rope, widen(latent), widen(rope), seq_lens, scale, window, splits,
                                   filled=256)
    assert spans == [256]
    ref = latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, scale, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


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


