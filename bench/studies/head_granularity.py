"""Head-level or group-level token selection: what ZSMerge's per-kv-head budget is worth on a source model.

    python -m bench.studies.head_granularity                      # SmolLM2, 12 windows of Persuasion, 5% kept
    python -m bench.compare_policies bench/results/head_granularity_smollm2_cpu.json --against "zsmerge/group"

The ZSMerge authors budget each kv head: every head keeps its own heavy hitters and merges its own evicted tokens.
kvconvert's policies budget a layer group, whose one latent every head reads, so all of a group's heads keep the
same tokens. For a source model (one layer a group, one key and value head per kv head) the two can differ, and this
measures by how much, outside the runtime: kvconvert.runtime.policies.reference runs the source in transformers
under kvpress's protocol (compress the prompt once, score the --score-last tokens that extend it; the windows of
`python -m bench.zsmerge --prompt-only`).

The rows: the full cache and the reference's methods h2o/group, h2o/head, zsmerge/group, zsmerge/head (the group rows
reproduce the runtime's zsmerge:residual=0 and zsmerge), all at one budget with the runtime's ZSMerge's sizes and
defaults: its slots for the window, split into recent and merge slots as it splits them, its decay, and its number
of scoring queries unless --queries. Writes bench/results/<--name>.json with each row's per-window NLL (for
`python -m bench.compare_policies`).
"""

from __future__ import annotations

import math
import sys
import time

import torch

from bench.common import argument_parser, data_file, write_result
from kvconvert.runtime.policies.reference import LLAMA_LIKE, METHODS, window_nll


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=None, help="default: ../shared/data/austen_persuasion.txt")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--score-last", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--budget", type=float, default=0.05, help="kept tokens as a share of the window")
    ap.add_argument("--queries", type=int, default=None,
                    help="prompt queries that score the prompt (default: the runtime's, --kv-queries)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--name", default="head_granularity_smollm2_cpu")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        sys.exit(f"error: unknown method {unknown[0]!r} (have: {', '.join(METHODS)})")

    import transformers

    from kvconvert.convert.source import load_source, resolve
    from kvconvert.evaluate import read_text, text_windows
    from kvconvert.runtime.policies import make_policy

    transformers.utils.logging.disable_progress_bar()
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    src = load_source(resolve(args.model), dtype=dtype)
    model, tok = src.model.to(device).eval(), src.tokenizer
    if model.config.model_type not in LLAMA_LIKE:
        sys.exit(f"error: {model.config.model_type} models are not supported here (have: {', '.join(LLAMA_LIKE)})")
    windows = text_windows(tok, read_text(data_file("austen_persuasion.txt", args.text)), args.window,
                           args.window * args.windows)
    W, ctx = windows.shape[1], windows.shape[1] - args.score_last
    # the runtime's sizes and defaults, with the authors' merge slots (off by default) for the merging rows
    policy = make_policy("zsmerge", args.budget, queries=args.queries, residual=0.02)
    keep = policy.slots(W)
    recent, merge_slots = policy.split(keep)
    decay, queries = policy.decay, policy.prefill_queries
    print(f"{windows.shape[0]} windows of {W}: {ctx} prompt tokens kept as {keep} slots ({recent} recent, "
          f"{merge_slots} merge), decay {decay}, {queries} scoring queries", flush=True)

    per_window: dict[str, list[float]] = {m: [] for m in ["full", *methods]}
    t0 = time.perf_counter()
    for n in range(windows.shape[0]):
        nll = window_nll(model, windows[n : n + 1].to(device), ctx, methods, keep, recent, merge_slots, decay,
                         queries)
        for m, v in nll.items():
            per_window[m].append(v)
        print(f"window {n + 1}/{windows.shape[0]}: " + ", ".join(f"{m} {math.exp(v):.3f}" for m, v in nll.items()),
              flush=True)

    full_nll = sum(per_window["full"]) / len(per_window["full"])
    rows = []
    for method, nll in per_window.items():
        mean = sum(nll) / len(nll)
        rows.append({"model": "source", "policy": method, "budget": 1.0 if method == "full" else args.budget,
                     "perplexity": math.exp(mean), "ppl_vs_full": math.exp(mean - full_nll), "window_nll": nll})
        print(f"{method:14s} perplexity {rows[-1]['perplexity']:.3f}  x full {rows[-1]['ppl_vs_full']:.3f}")
    path = write_result(args.name, {
        "tool": "reference", "harness": "transformers, kvpress's protocol (bench/studies/head_granularity.py)",
        "window": W, "score_last": args.score_last, "windows": windows.shape[0], "kept": keep, "recent": recent,
        "merge_slots": merge_slots, "decay": decay, "queries": queries, "seconds": round(time.perf_counter() - t0, 1), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
