"""Where a decode step's GPU time goes: the runtime's decode step (eager, so each kernel is seen) under
torch.profiler, the kernels ranked by total device time, beside the captured step's wall time.

    python -m bench.profile_decode --model OUT --batch 64 --context 8000    # bench/results/decode_profile_<dev>.json

The cache is filled with random codes (as `profile speed --no-prefill`): kernel times do not depend on the values.
"""

from __future__ import annotations


import torch

from bench.common import argument_parser, write_result


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--model", required=True, help="converted CLLA folder")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from kvconvert.loading import load_for_runtime
    from kvconvert.runtime import LatentRuntime
    from kvconvert.runtime.profile import fill_cache_for_timing, time_decode

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = load_for_runtime(args.model, dtype, device).model
    rt = LatentRuntime(model, args.batch, args.context + 2 * args.steps + 8, cuda_graphs=False,
                       cpu_layout=not cuda and args.batch == 1)  # as `kvconvert chat` runs one row on CPU
    fill_cache_for_timing(rt, args.context)
    eager_step = time_decode(rt, args.steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        time_decode(rt, args.steps, warmup=0)
    attr = "device_time_total" if cuda else "cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0 and (not cuda or "CUDA" in str(getattr(e, "device_type", "")))]
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events)
    rows = [{"kernel": e.key[:120], "calls_per_step": e.count / args.steps, "us_per_step": getattr(e, attr) / args.steps,
             "share": getattr(e, attr) / total} for e in events[: args.top]]
    graphed = LatentRuntime(model, args.batch, args.context + 2 * args.steps + 8, cuda_graphs=cuda)
    fill_cache_for_timing(graphed, args.context)
    graph_step = time_decode(graphed, args.steps)
    print(f"decode step, batch {args.batch} × context {args.context:,}: eager {eager_step * 1e3:.2f} ms, "
          f"{'graphed' if cuda else 'again'} {graph_step * 1e3:.2f} ms; kernel time {total / args.steps / 1e3:.2f} ms per step")
    for r in rows:
        print(f"{r['us_per_step']:9.1f} us {r['share']:6.1%} ×{r['calls_per_step']:5.1f}  {r['kernel']}")
    path = write_result("decode_profile_" + ("gpu" if cuda else "cpu"), {
        "model": args.model, "batch": args.batch, "context": args.context, "dtype": str(dtype).removeprefix("torch."),
        "eager_step_ms": eager_step * 1e3, "graph_step_ms": graph_step * 1e3,
        "kernel_us_per_step": total / args.steps, "kernels": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
