"""What a cache policy's bookkeeping costs per decode step: a step under the policy against a step of the same model
over a plain cache of the same number of slots, with the eviction batched on the device (evict_one) and per row.

Per point (batch × policy × eviction): the prompt (random tokens, `--context` long) is prefilled under the policy,
which compresses it to the budget; then `--steps` decode steps are timed, and within them the policy's own work after
each step (`_apply_policy`: decay, add the step's attention, evict). The rest of a policy step's extra time is the
attention weights it computes for scoring (a second pass over the cache, which StreamingLLM skips). The baseline is a
plain runtime holding as many slots as the budget, so that the attention itself costs the same.

    python -m bench.policy_step                      # SmolLM2 through an identity conversion, 2k, batch 1 and 8
    python -m bench.policy_step --model OUT --batch 1,16 --budget 0.1
"""

from __future__ import annotations

import time

import torch

from bench.common import argument_parser, write_result


def ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x]


def timed_steps(rt, steps: int, sync) -> tuple[float, float]:
    """(seconds per decode step, seconds of it in _apply_policy) over `steps` steps after two warm-up steps."""
    spent = [0.0]
    apply = rt._apply_policy

    def timed(*args):
        sync()
        t0 = time.perf_counter()
        apply(*args)
        sync()
        spent[0] += time.perf_counter() - t0

    rt._apply_policy = timed
    ids = torch.zeros(rt.cache.batch, dtype=torch.long, device=rt.device)
    for _ in range(2):
        rt.decode(ids)
    sync()
    spent[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        rt.decode(ids)
    sync()
    return (time.perf_counter() - t0) / steps, spent[0] / steps


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--model", default="smollm2", help="converted folder, or a source (identity conversion)")
    ap.add_argument("--policies", default="zsmerge,h2o,streaming")
    ap.add_argument("--budget", type=float, default=0.25, help="share of the context kept")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--name", default=None, help="result file (default: policy_step_cpu or policy_step_gpu)")
    args = ap.parse_args()

    from kvconvert.loading import load_for_runtime
    from kvconvert.runtime import LatentRuntime
    from kvconvert.runtime.policies import make_policy

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = load_for_runtime(args.model, dtype, device).model
    context = args.context + args.steps + 3
    gen = torch.Generator().manual_seed(0)
    points: list[dict] = []
    result = {"model": args.model, "dtype": str(dtype).removeprefix("torch."), "context": args.context,
              "budget": args.budget, "steps": args.steps, "points": points}
    for b in ints(args.batch):
        ids = torch.randint(0, model.config.vocab_size, (b, args.context), generator=gen).to(device)
        slots = make_policy("zsmerge", args.budget).slots(context)
        plain = LatentRuntime.for_context(model, b, slots + args.steps + 3, cuda_graphs=False)
        plain.prefill_chunked(ids[:, :slots], [slots] * b)
        base, _ = timed_steps(plain, args.steps, sync)
        for name in args.policies.split(","):
            for batched in (True, False):
                policy = make_policy(name, args.budget)
                policy.batched_step = batched
                rt = LatentRuntime.for_context(model, b, context, policy=policy)
                rt.prefill_chunked(ids, [args.context] * b)
                step, bookkeeping = timed_steps(rt, args.steps, sync)
                points.append({"batch": b, "policy": name, "eviction": "batched" if batched else "per row",
                               "slots": rt.policy.n_slots, "step_ms": step * 1e3, "bookkeeping_ms": bookkeeping * 1e3,
                               "plain_step_ms": base * 1e3, "overhead_ms": (step - base) * 1e3})
                p = points[-1]
                print(f"batch {b:3d} {name:9s} {p['eviction']:8s}: step {p['step_ms']:7.2f} ms (plain cache of "
                      f"{slots} slots {p['plain_step_ms']:7.2f}), bookkeeping {p['bookkeeping_ms']:6.2f} ms", flush=True)
                write_result(args.name or "policy_step_" + ("gpu" if cuda else "cpu"), result)


if __name__ == "__main__":
    main()
