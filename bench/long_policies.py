"""Token-budget cache policies on the long-context suite, query-agnostic: each haystack is compressed to the budget,
then the question is asked (kvpress's protocol; `kvconvert eval --long --kv-policy P`).

    python -m bench.long_policies --cpu      # SmolLM2 source; 2k; single, multikey; 6 trials; 25% and 10%
    python -m bench.long_policies --model OUT --lengths 2048,4096 --trials 20 --budgets 0.25,0.1,0.05

Every method answers the same seeded trials (`kvconvert.longcontext`) as the full cache, and is paired with it trial
by trial (share of its accuracy, wins, losses, exact McNemar p). --methods lists policies with optional knobs, as
`kvconvert eval`'s --kv-* options: zsmerge:score=reconstruct,recent=0.1. The haystack is Northanger Abbey's prose
(--text; `generated` for the built-in one). --query-aware puts the question inside the compressed prompt instead.
Writes bench/results/<--name>.json after every method.
"""

from __future__ import annotations

import time

from bench.common import argument_parser, parse_policy, suite_presets, write_result

CPU_METHODS = "zsmerge+zsmerge:score=reconstruct+h2o:score=reconstruct+streaming"


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--model", default="smollm2", help="a source (run through the identity conversion) or a CLLA folder")
    ap.add_argument("--cpu", action="store_true", help="the CPU preset (see the usage above)")
    ap.add_argument("--methods", default=None, help=f"'+'-separated (default {CPU_METHODS})")
    ap.add_argument("--budgets", default=None, help="shares of the prompt (default 0.25,0.1; GPU 0.25,0.1,0.05)")
    ap.add_argument("--lengths", default=None, help="prompt lengths (default 2048; GPU 2048,4096)")
    ap.add_argument("--tasks", default=None, help="default single,multikey (GPU: every task)")
    ap.add_argument("--trials", type=int, default=None, help="per task and length (default 6; GPU 20)")
    ap.add_argument("--text", default=None, help="haystack text (default ../shared/data/austen_northangerabbey.txt)")
    ap.add_argument("--query-aware", action="store_true", help="compress each prompt with its question")
    ap.add_argument("--name", default=None, help="result file name (default long_policies_smollm2[_cpu])")
    args = ap.parse_args()

    import torch

    from kvconvert.evaluate import repeat_ids, runtime_generator
    from kvconvert.loading import load_for_runtime
    from kvconvert.longcontext import compare_suites, run_suite
    from kvconvert.runtime.policies import make_policy

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    methods = (args.methods or CPU_METHODS).split("+")
    budgets, lengths, tasks, trials, sentences, haystack = suite_presets(args, gpu)
    loaded = load_for_runtime(args.model, dtype, device)
    model, tok = loaded.model, loaded.tokenizer
    repeat = repeat_ids(tok)
    name = args.name or ("long_policies_smollm2" + ("_cpu" if args.cpu else ""))
    rows: list[dict] = []

    def suite(factory) -> tuple[list[dict], float]:
        gen = runtime_generator(model, factory, repeat=repeat, query_aware=args.query_aware)
        t0 = time.perf_counter()
        out = run_suite(model, tok, tasks, lengths, trials, sentences=sentences, generate=gen)
        return out, time.perf_counter() - t0

    full, seconds = suite(lambda: None)
    rows.append({"method": "full", "budget": 1.0, "suite": full, "seconds": round(seconds, 1)})
    print(f"full: {[(r['task'], r['length'], sum(r['passed'])) for r in full]} ({seconds:.0f} s)", flush=True)

    def save():
        return write_result(name, {"model": args.model, "tasks": tasks, "lengths": lengths, "trials": trials,
                                   "haystack": haystack,
                                   "question": "in the compressed prompt" if args.query_aware else "after compression",
                                   "rows": rows})

    save()
    for budget in budgets:
        for label in methods:
            policy, kw = parse_policy(label)
            got, seconds = suite(lambda p=policy, b=budget, kw=kw: make_policy(p, b, **kw))
            paired = compare_suites(got, full)
            passed = sum(sum(r["passed"]) for r in paired)
            of_full = passed / max(1, sum(sum(r["passed"]) for r in full))
            rows.append({"method": label, "budget": budget, "suite": paired, "passed": passed,
                         "of_full": of_full, "seconds": round(seconds, 1)})
            save()
            print(f"{budget:5.2f} {label:40s} " + "  ".join(
                f"{r['task']}@{r['length']} {sum(r['passed'])}/{r['trials']} (w{r['wins']} l{r['losses']} p {r['p']:.2f})"
                for r in paired) + f"  pooled {of_full:.0%} of full ({seconds:.0f} s)", flush=True)
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
