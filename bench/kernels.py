"""Latent decode kernel: achieved bandwidth (counted bytes) against the device's measured copy bandwidth.

    python bench/kernels.py                      # GPU: the grid below, B·T ≥ 1M tokens per point
    python bench/kernels.py --quick              # smaller grid (also runs on CPU through the reference, as a smoke test)

Counted bytes per call = what the kernel must read from the cache for B rows × T positions (latent codes, their
scales and zero-points, rope keys) + queries and outputs; copy bandwidth = bytes read + written by a large
device-to-device copy. Every point is also checked against the PyTorch reference before it is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import write_result  # noqa: E402

# (batch, positions) with B·T ≥ 1M; latent widths: SmolLM2 at 2% (32), a mid plan (128), DeepSeek-like (512).
GRID = [(1, 1 << 20), (16, 1 << 16), (64, 1 << 14), (128, 1 << 13), (256, 1 << 12)]
QUICK = [(1, 4096), (8, 1024)]
LATENTS = [(32, 4), (128, 4), (512, 4), (512, 8), (512, 16)]  # (width, bits)


def timed(fn, device, reps: int) -> float:
    """Median seconds per call."""
    import time

    times = []
    for _ in range(3):
        fn()
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


def copy_bandwidth(device, gib: float) -> float:
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dt = timed(lambda: dst.copy_(src), device, 20)
    return 2 * n / dt / 1e9


def make_stream(B: int, S: int, width: int, bits: int, group: int, device, gen):
    from kvconvert.kernels import Stream
    from kvconvert.runtime.cache import stored_width

    if bits == 16:
        data = torch.randn(B, S, width, device=device, generator=gen).to(torch.bfloat16 if device.type == "cuda" else torch.float16)
        return Stream(data, None, bits, group, width)
    data = torch.randint(0, 256, (B, S, stored_width(width, bits)), dtype=torch.uint8, device=device, generator=gen)
    scales = torch.stack(
        (torch.rand(B, S, width // group, device=device, generator=gen) * 0.02 + 0.001,
         torch.rand(B, S, width // group, device=device, generator=gen) - 0.5), -1
    ).half()
    return Stream(data, scales, bits, group, width)


def stream_bytes(s, B: int, T: int) -> int:
    per = s.data[0, 0].nbytes + (0 if s.scales is None else s.scales[0, 0].nbytes)
    return B * T * per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small grid (CPU smoke test)")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--rope-dim", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()

    from kvconvert.kernels import latent_decode
    from kvconvert.kernels.reference import latent_decode_ref

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    copy = copy_bandwidth(device, 2.0 if device.type == "cuda" else 0.25)
    print(f"copy bandwidth {copy:,.0f} GB/s on {device}")
    rows = []
    for B, T in QUICK if args.quick else GRID:
        for width, bits in LATENTS:
            H = args.heads
            latent = make_stream(B, T, width, bits, 32, device, gen)
            rope = make_stream(B, T, args.rope_dim, bits, 32, device, gen)
            q_lat = torch.randn(B, H, width, device=device, generator=gen).to(dtype) * 0.05
            q_rope = torch.randn(B, H, args.rope_dim, device=device, generator=gen).to(dtype) * 0.05
            lens = torch.full((B,), T, dtype=torch.int32, device=device)
            run = lambda: latent_decode(q_lat, q_rope, latent, rope, lens, 0.125)  # noqa: E731
            check_rows = slice(0, 1)
            got = latent_decode(q_lat[check_rows], q_rope[check_rows], latent.rows(check_rows), rope.rows(check_rows), lens[check_rows], 0.125).float()
            want = latent_decode_ref(q_lat[check_rows].float(), q_rope[check_rows].float(), latent.rows(check_rows), rope.rows(check_rows), lens[check_rows], 0.125)
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            dt = timed(run, device, args.reps)
            counted = stream_bytes(latent, B, T) + stream_bytes(rope, B, T) + 2 * q_lat.nbytes + q_rope.nbytes
            gbps = counted / dt / 1e9
            rows.append(dict(batch=B, positions=T, latent_dim=width, bits=bits, rope_dim=args.rope_dim, heads=H,
                             us=dt * 1e6, counted_bytes=counted, gb_per_s=gbps, share_of_copy=gbps / copy, max_rel_err=err))
            print(f"B {B:4d} T {T:8,d} R {width:4d} @{bits:2d}b: {dt * 1e6:9.1f} us  {gbps:8,.0f} GB/s  "
                  f"{gbps / copy:6.1%} of copy  (rel err {err:.1e})")
    name = "kernels_" + ("quick_" if args.quick else "") + ("gpu" if device.type == "cuda" else "cpu")
    path = write_result(name, {"copy_gb_per_s": copy, "points": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
