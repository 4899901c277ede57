"""Latent decode kernel: achieved bandwidth (counted bytes) against the device's measured copy bandwidth.

    python -m bench.kernels                      # GPU: the grid below, B·T ≥ 1M tokens per point
    python -m bench.kernels --quick              # smaller grid (also runs on CPU through the reference, as a smoke test)
    python -m bench.kernels --sweep              # GPU: launch parameters (tile, warps, stages, programs per SM) and
                                                 # the tile loads (vector or per-value `gather`) at a few points, the
                                                 # fastest first (bench/results/kernels_sweep_gpu.json)
    python -m bench.kernels --rope-up            # GPU: the default plans (rope keys rebuilt from the latent in the
                                                 # kernel) against their roofline, and against the keys materialized
                                                 # as a 16-bit stream first (bench/results/kernels_rope_up_gpu.json)

Counted bytes per call = what the kernel must read from the cache for B rows × T positions (latent codes, their
scales and zero-points, rope keys) + queries and outputs; copy bandwidth = bytes read + written by a large
device-to-device copy. Every point is also checked against the PyTorch reference before it is timed. Kernel time is timed from
replays of a captured CUDA graph (as the runtime's decode step runs it); `us_with_launch` adds the host's launch.
"""

from __future__ import annotations

import sys

import torch

from bench.common import argument_parser, write_result
from kvconvert.runtime.profile import copy_bandwidth, matmul_peak


# (batch, positions) with B·T ≥ 1M; latent widths: SmolLM2 at 2% (32), a mid plan (128), DeepSeek-like (512), and
# latents with a 2-bit tail: SmolLM2's 0.25 plan (128 @ 4 + 96 @ 2) and 0.10 plan (64 @ 4 + 128 @ 2).
GRID = [(1, 1 << 20), (16, 1 << 16), (64, 1 << 14), (128, 1 << 13), (256, 1 << 12)]
QUICK = [(1, 4096), (8, 1024)]
LATENTS = [(32, 4, 0), (128, 4, 0), (512, 4, 0), (512, 8, 0), (512, 16, 0), (128, 4, 96), (64, 4, 128)]  # (width, bits, 2-bit tail)


def timed(fn, device, reps: int, graph: bool = False) -> float:
    """Median seconds per call. graph: on CUDA, capture fn once and time its replays, which leaves out the host's
    launch overhead (Triton's Python launcher costs tens to hundreds of µs a call): the runtime's decode step is a
    captured graph, so that is the kernel time decoding pays."""
    import time

    for _ in range(3):
        fn()
    if graph and device.type == "cuda":
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def make_stream(B: int, S: int, width: int, bits: int, group: int, device, gen):
    from kvconvert.cache_layout import Stream
    from kvconvert.cache_layout import stored_width

    if bits == 16:
        data = torch.randn(B, S, width, device=device, generator=gen).to(torch.bfloat16 if device.type == "cuda" else torch.float16)
        return Stream(data, None, bits, group, width)
    data = torch.randint(0, 256, (B, S, stored_width(width, bits)), dtype=torch.uint8, device=device, generator=gen)
    scales = torch.stack(
        (torch.rand(B, S, width // group, device=device, generator=gen) * 0.02 + 0.001,
         torch.rand(B, S, width // group, device=device, generator=gen) - 0.5), -1
    ).half()
    return Stream(data, scales, bits, group, width)


SWEEP_POINTS = [(64, 1 << 14, 32, 4), (1, 1 << 20, 32, 4), (64, 1 << 14, 128, 4), (64, 1 << 14, 512, 4)]


def sweep(args, device, dtype, gen, copy: float) -> None:
    """Time every launch configuration of the split kernel at SWEEP_POINTS (each checked against the reference on
    one row first); write them all, the fastest first per point."""
    import itertools

    import triton

    rows: list[dict] = []
    H = args.heads
    for B, T, width, bits in SWEEP_POINTS:
        point_args, want, counted = make_point(B, T, width, bits, 0, H, args.rope_dim, device, dtype, gen)
        per_position = 2 * (max(16, triton.next_power_of_2(width // 2)) + max(16, triton.next_power_of_2(args.rope_dim // 2)))
        tiles = [t for t in (16, 32, 64, 128, 256) if t * per_position <= 16384][-3:]
        point = []
        for gather, block_t, warps, stages, ppsm in itertools.product((False, True), tiles, (4, 8), (1, 3), (2, 8, 32)):
            kw = dict(block_t=block_t, num_warps=warps, num_stages=stages, programs_per_sm=ppsm, gather=gather)
            try:
                err = rel_err(decode(first_row(point_args), **kw), want)
                dt = timed(lambda: decode(point_args, **kw), device, 10, graph=True)
            except Exception as e:  # a configuration that does not compile (registers, shared memory) is skipped
                print(f"  {kw}: {e.__class__.__name__}")
                continue
            gbps = counted / dt / 1e9
            point.append(dict(batch=B, positions=T, latent_dim=width, bits=bits, **kw, us=dt * 1e6,
                              gb_per_s=gbps, share_of_copy=gbps / copy, max_rel_err=err))
        point.sort(key=lambda r: r["us"])
        rows += point
        for r in point[:5]:
            print(f"B {B:3d} T {T:8,d} R {width:4d} @{bits}b  block_t {r['block_t']:3d} warps {r['num_warps']} "
                  f"stages {r['num_stages']} programs/SM {r['programs_per_sm']:2d}{' gather' if r['gather'] else ''}: "
                  f"{r['us']:8.1f} us "
                  f"{r['gb_per_s']:7,.0f} GB/s {r['share_of_copy']:6.1%} (err {r['max_rel_err']:.1e})", flush=True)
        write_result("kernels_sweep_gpu", {"copy_gb_per_s": copy, "heads": H, "rope_dim": args.rope_dim, "points": rows})


# Plans with rope keys from the latent (SmolLM2: 9 query heads, 3 kv heads x 64 rope dims rebuilt per layer; no key
# dim outside the rope keys, so no q_lat): (name, head width, head bits, tail width, tail bits), quant group 32
ROPE_UP_PLANS = [("default 0.02", 32, 4, 64, 2), ("default 0.25", 32, 8, 224, 4)]
ROPE_UP_GRID = [(1, 1 << 20), (64, 1 << 13), (64, 1 << 14), (256, 1 << 12)]


def rope_up_point(B: int, T: int, plan: tuple, heads: int, kv_heads: int, rope_dim: int, device, dtype, gen):
    """(fused call, materialized call, row-0 check, counted bytes, FLOPs) of one plan at B rows x T positions."""
    from kvconvert.kernels import RopeUp, decode_attention as kd
    from kvconvert.kernels.reference import dequantize_streams, latent_decode_ref, rope_up_keys
    from kvconvert.cache_layout import Stream

    _, width, bits, tail, tail_bits = plan
    latent = make_stream(B, T, width, bits, 32, device, gen)
    tail_stream = make_stream(B, T, tail, tail_bits, 32, device, gen)
    R, Wr = width + tail, kv_heads * rope_dim
    freq = 10000.0 ** -(torch.arange(Wr // 2, device=device) % (rope_dim // 2) / (rope_dim // 2))
    ru = RopeUp((torch.randn(Wr, R, device=device, generator=gen) / R**0.5).to(dtype), None, freq.float(), 1.0)
    q = torch.zeros(B, heads, Wr, device=device)
    per = heads // kv_heads
    for h in range(heads):  # each query head reads its own kv head's rope dims
        j = h // per
        q[:, h, j * rope_dim : (j + 1) * rope_dim] = torch.randn(B, rope_dim, device=device, generator=gen)
    q = q.to(dtype)
    lens = torch.full((B,), T, dtype=torch.int32, device=device)
    scale = 1 / rope_dim**0.5

    def fused(block_t=None):
        return kd._latent_decode(None, q, latent, None, lens, scale, None, None, tail=tail_stream, rope_up=ru,
                                 block_t=block_t)

    def materialized():  # the runtime's path before the fused kernel: dequantize, rebuild, rotate, then read them
        c = dequantize_streams([latent, tail_stream], T, dtype)
        keys = rope_up_keys(ru, c, lens, T).to(dtype)
        return kd._latent_decode(None, q, latent, Stream(keys, None, 16, 1, Wr), lens, scale, None, None, tail=tail_stream)

    one = slice(0, 1)
    want = latent_decode_ref(None, q[one].float(), latent.rows(one), None, lens[one], scale, None,
                             tail=tail_stream.rows(one), rope_up=RopeUp(ru.weight.float(), None, ru.freq, 1.0))
    check = lambda: kd._latent_decode(None, q[one], latent.rows(one), None, lens[one], scale, None, None,  # noqa: E731
                                      tail=tail_stream.rows(one), rope_up=ru)
    counted = stream_bytes(latent, B, T) + stream_bytes(tail_stream, B, T) + q.nbytes + B * heads * R * q.element_size()
    # per slot: the rebuild (R x Wr multiply-adds), the rotation, the scores (every head over Wr) and values (over R)
    flops = B * T * (2 * R * Wr + 3 * Wr + 2 * heads * Wr + 2 * heads * R)
    return fused, materialized, (check, want), counted + ru.weight.nbytes, flops


def rope_up_bench(args, device, dtype, gen, copy: float) -> None:
    """The fused kernel at ROPE_UP_GRID x ROPE_UP_PLANS: time, GB/s of the counted bytes, FLOP/s, and the share of
    the roofline, max(bytes / copy bandwidth, FLOPs / matmul peak) over the time; beside it the materialized path."""
    peak = matmul_peak(device, dtype)
    print(f"matmul peak {peak / 1e12:,.1f} TFLOP/s ({dtype})")
    rows = []
    name = "kernels_rope_up_" + ("gpu" if device.type == "cuda" else "cpu")
    for B, T in ROPE_UP_GRID if device.type == "cuda" else [(1, 2048), (4, 512)]:
        for plan in ROPE_UP_PLANS:
            fused, materialized, (check, want), counted, flops = rope_up_point(B, T, plan, args.heads, 3, 64, device,
                                                                                dtype, gen)
            err = rel_err(check(), want)
            # the default tile (16 positions at these widths) and 32 (no register spills on sm_90a either:
            # bench.tools.compile_sm90); the faster is the point's time
            tiles = {bt: timed(lambda bt=bt: fused(bt), device, args.reps, graph=True) for bt in (None, 32)}
            dt = min(tiles.values())
            try:
                dt_mat = timed(materialized, device, max(3, args.reps // 4), graph=True)
            except torch.OutOfMemoryError:
                dt_mat = None
            bound = max(counted / (copy * 1e9), flops / peak)
            rows.append(dict(plan=plan[0], batch=B, positions=T, us=dt * 1e6, counted_bytes=counted, flops=flops,
                             gb_per_s=counted / dt / 1e9, share_of_copy=counted / dt / 1e9 / copy,
                             tflop_per_s=flops / dt / 1e12, share_of_peak=flops / dt / peak,
                             bound="compute" if flops / peak > counted / (copy * 1e9) else "memory",
                             share_of_roofline=bound / dt, materialized_us=None if dt_mat is None else dt_mat * 1e6,
                             us_by_block_t={str(k or "default"): v * 1e6 for k, v in tiles.items()},
                             max_rel_err=err))
            r = rows[-1]
            print(f"B {B:4d} T {T:8,d} {plan[0]:>13s}: {r['us']:9.1f} us  {r['gb_per_s']:7,.0f} GB/s "
                  f"{r['tflop_per_s']:6.1f} TFLOP/s  {r['share_of_roofline']:6.1%} of its roofline ({r['bound']}-bound)"
                  f"  materialized {r['materialized_us'] or float('nan'):9.1f} us  (rel err {err:.1e})", flush=True)
            write_result(name, {"copy_gb_per_s": copy, "matmul_tflop_per_s": peak / 1e12, "dtype": str(dtype),
                                "points": rows})


def stream_bytes(s, B: int, T: int) -> int:
    per = s.data[0, 0].nbytes + (0 if s.scales is None else s.scales[0, 0].nbytes)
    return B * T * per


def make_point(B: int, T: int, width: int, bits: int, tail: int, heads: int, rope_dim: int, device, dtype, gen):
    """One timed point: (args of latent_decode for B rows × T positions and a 2-bit tail stream or None, the
    reference output of row 0, the bytes a call must read: cache streams + queries + output)."""
    from kvconvert.kernels.reference import latent_decode_ref

    latent = make_stream(B, T, width, bits, 32, device, gen)
    tail_stream = make_stream(B, T, tail, 2, 32, device, gen) if tail else None
    rope = make_stream(B, T, rope_dim, bits, 32, device, gen)
    q_lat = torch.randn(B, heads, width + tail, device=device, generator=gen).to(dtype) * 0.05
    q_rope = torch.randn(B, heads, rope_dim, device=device, generator=gen).to(dtype) * 0.05
    lens = torch.full((B,), T, dtype=torch.int32, device=device)
    args = (q_lat, q_rope, latent, rope, lens, tail_stream)
    want = latent_decode_ref(*first_row(args, float)[:5], 0.125, tail=first_row(args)[5])
    counted = sum(stream_bytes(s, B, T) for s in (latent, tail_stream, rope) if s is not None) + 2 * q_lat.nbytes + q_rope.nbytes
    return args, want, counted


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def first_row(args: tuple, cast=None) -> tuple:
    """Row 0 of make_point's args (queries cast to `cast`: float for the fp32 reference)."""
    q_lat, q_rope, latent, rope, lens, tail = args
    one = slice(0, 1)
    q_lat, q_rope = (q_lat[one], q_rope[one]) if cast is None else (q_lat[one].float(), q_rope[one].float())
    return q_lat, q_rope, latent.rows(one), rope.rows(one), lens[one], None if tail is None else tail.rows(one)


def decode(args: tuple, **kw):
    """latent_decode_triton's launcher (`_latent_decode`, launch parameters in kw) on make_point's args."""
    from kvconvert.kernels import decode_attention as kd

    q_lat, q_rope, latent, rope, lens, tail = args
    return kd._latent_decode(q_lat, q_rope, latent, rope, lens, 0.125, None, None, tail=tail, **kw)


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="small grid (CPU smoke test)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--rope-dim", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="time the kernel's launch parameters (GPU)")
    ap.add_argument("--rope-up", action="store_true",
                    help="the default plans' kernel (rope keys rebuilt from the latent) against its roofline")
    args = ap.parse_args()

    from kvconvert.kernels import latent_decode

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    copy = copy_bandwidth(device, 2.0 if device.type == "cuda" else 0.25)
    print(f"copy bandwidth {copy:,.0f} GB/s on {device}")
    if args.sweep:
        if device.type != "cuda":
            sys.exit("error: --sweep times the compiled kernel: it needs CUDA")
        return sweep(args, device, dtype, gen, copy)
    if args.rope_up:
        return rope_up_bench(args, device, dtype, gen, copy)
    rows: list[dict] = []
    name = "kernels_" + ("quick_" if args.quick else "") + ("gpu" if device.type == "cuda" else "cpu")
    for B, T in QUICK if args.quick else GRID:
        for width, bits, tail in LATENTS:
            H = args.heads
            point_args, want, counted = make_point(B, T, width, bits, tail, H, args.rope_dim, device, dtype, gen)

            def call(a):
                return latent_decode(*a[:5], 0.125, tail=a[5])

            run = lambda: call(point_args)  # noqa: E731
            err = rel_err(call(first_row(point_args)), want)
            dt = timed(run, device, args.reps, graph=True)
            dt_eager = timed(run, device, args.reps)
            gbps = counted / dt / 1e9
            rows.append(dict(batch=B, positions=T, latent_dim=width, bits=bits, tail_dim=tail, rope_dim=args.rope_dim, heads=H,
                             us=dt * 1e6, us_with_launch=dt_eager * 1e6, counted_bytes=counted, gb_per_s=gbps, share_of_copy=gbps / copy, max_rel_err=err))
            latent = f"{width} @{bits:2d}b" + (f" + {tail} @ 2b" if tail else "")
            print(f"B {B:4d} T {T:8,d} R {latent:>18s}: {dt * 1e6:9.1f} us ({dt_eager * 1e6:7.1f} launched) {gbps:8,.0f} GB/s  "
                  f"{gbps / copy:6.1%} of copy  (rel err {err:.1e})", flush=True)
            write_result(name, {"copy_gb_per_s": copy, "points": rows})  # a run cut short keeps what it measured
    path = write_result(name, {"copy_gb_per_s": copy, "points": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
