"""Token-budget cache policies (ZSMerge, H2O, StreamingLLM) on SmolLM2, alone and on top of CLLA.

    python -m bench.zsmerge --clla OUT                         # GPU defaults: 8 windows, 50 passkey trials at 2k/4k/8k
    python -m bench.zsmerge --clla OUT --cpu                   # CPU preset: 3 windows, budgets 5% and 25%, passkey 2k x 10
    python -m bench.zsmerge --cpu --models source --windows 0 --passkey 2048 --passkey-trials 50  # passkey only

OUT: SmolLM2 converted to 5% of its cache (`kvconvert convert smollm2 OUT --kv-ratio 0.05`). For the source
(through the identity conversion, in kvconvert's runtime) and OUT, with the full cache and each policy × budget:
perplexity over --window-token windows of Persuasion, scored on the last --score-last tokens (the context before
them is prefilled and compressed to the budget once, or every --prompt-chunk tokens; the scored tokens then go
through in 256-token chunks, compressed back to the budget after each; with --prompt-only, kvpress's protocol,
they extend the compressed cache instead),
and passkey accuracy (greedy, first number = key) at --passkey lengths. Budgets are shares of the window (text) or
of the prompt (passkey); each row keeps its trials' outcomes (`passkey_passed`: the same seeded trials for every
row, so rows compare trial by trial). Writes bench/results/zsmerge_smollm2[_cpu].json.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import argument_parser, data_file, parse_policy, policy_presets, write_result


def parse_args() -> argparse.Namespace:
    ap = argument_parser(__doc__)
    ap.add_argument("--clla", default=None, help="SmolLM2 converted to 5%% (a CLLA folder; needed for the clla-5%% rows)")
    ap.add_argument("--cpu", action="store_true", help="the small CPU preset")
    ap.add_argument("--text", default=None, help="default: ../shared/data/austen_persuasion.txt")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--score-last", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=None, help="perplexity windows (0: passkey only)")
    ap.add_argument("--budgets", default=None)
    ap.add_argument("--policies", default="zsmerge,h2o,streaming",
                    help="comma-separated; a policy may carry knobs, e.g. zsmerge:residual=0 (recent, residual, decay, queries, score)")
    ap.add_argument("--passkey", default=None, help="lengths, e.g. 2048,4096 ('none': perplexity only)")
    ap.add_argument("--passkey-trials", type=int, default=None)
    ap.add_argument("--prompt-chunk", type=int, default=None,
                    help="compress the prompt after every N tokens (default: once after the whole prompt, as the paper)")
    ap.add_argument("--prompt-only", action="store_true",
                    help="kvpress's protocol: compress the prompt only; the scored tokens extend the compressed cache")
    ap.add_argument("--models", default="source,clla-5%", help="which of source, clla-5%% to run")
    ap.add_argument("--name", default=None, help="result file name (default zsmerge_smollm2[_cpu][_chunkN][_prompt_only])")
    return ap.parse_args()


def load_models(wanted: list[str], clla: str | None, dtype, device: str) -> dict:
    """{"source": SmolLM2 through the identity conversion, "clla-5%": the --clla folder}, those wanted, in the runtime."""
    from kvconvert.loading import load_clla, load_for_runtime

    if "clla-5%" in wanted and not clla:
        sys.exit("error: the clla-5% rows need --clla OUT (or --models source)")
    models = {}
    if "source" in wanted:
        models["source"] = load_for_runtime("smollm2", dtype, device)
    if "clla-5%" in wanted:
        models["clla-5%"] = load_clla(clla, dtype)
        models["clla-5%"].model.to(device)
    return models


def measure_row(model_name: str, loaded, tok, policy: str, budget: float, windows, lengths: list[int], trials: int,
                args: argparse.Namespace) -> dict:
    """One row: perplexity of `windows` (None: passkey only) and passkey accuracy of a model under `policy` (a name
    with optional :knob=value parts, or "full") at `budget`."""
    from kvconvert.evaluate import passkey_accuracy, repeat_ids, runtime_generator, score_windows_with_policy
    from kvconvert.runtime.policies import make_policy

    name_, kw = parse_policy(policy)
    factory = (lambda p=name_, b=budget, kw=kw: make_policy(p, b, **kw)) if policy != "full" else (lambda: None)
    repeat = repeat_ids(tok)
    t0 = time.perf_counter()
    ppl = score_windows_with_policy(loaded.model, windows, factory, args.score_last, prompt_chunk=args.prompt_chunk,
                                    prompt_only=args.prompt_only, repeat=repeat) if windows is not None else {}
    gen = runtime_generator(loaded.model, factory, prompt_chunk=args.prompt_chunk, repeat=repeat)
    keys = passkey_accuracy(loaded.model, tok, lengths, trials, generate=gen)
    return {
        "model": model_name, "policy": policy, "budget": budget,
        "kv_bytes_per_token": loaded.model.config.source_kv_bytes_per_token if model_name == "source" else None,
        "perplexity": ppl.get("perplexity"), "predictions": ppl.get("predictions"),
        "window_nll": ppl.get("window_nll"), "passkey": {str(p["length"]): p["accuracy"] for p in keys},
        "passkey_passed": {str(p["length"]): p["passed"] for p in keys},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    args = parse_args()
    windows_n = args.windows if args.windows is not None else (3 if args.cpu else 8)
    budgets, lengths, trials = policy_presets(args)
    policies = args.policies.split(",")

    import torch

    from kvconvert.evaluate import read_text, text_windows

    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    text = read_text(data_file("austen_persuasion.txt", args.text))
    models = load_models(args.models.split(","), args.clla, dtype, device)
    tok = next(iter(models.values())).tokenizer
    windows = text_windows(tok, text, args.window, args.window * windows_n) if windows_n else None
    name = args.name or ("zsmerge_smollm2" + ("_cpu" if args.cpu else "") + (f"_chunk{args.prompt_chunk}" if args.prompt_chunk else "")
                         + ("_prompt_only" if args.prompt_only else ""))
    rows = []

    def save():  # after every row: a run stopped at a time limit keeps what it measured
        for row in rows:  # relative to the same model's full cache
            full = next((r for r in rows if r["model"] == row["model"] and r["policy"] == "full"), None)
            row["ppl_vs_full"] = row["perplexity"] / full["perplexity"] if full and full["perplexity"] else None
        return write_result(name, {"window": args.window, "score_last": args.score_last, "windows": windows_n,
                                   "prompt_chunk": args.prompt_chunk, "prompt_only": args.prompt_only,
                                   "passkey_trials": trials, "budgets": budgets, "rows": rows})

    for model_name, loaded in models.items():
        for policy in ["full", *policies]:
            for budget in [1.0] if policy == "full" else budgets:
                row = measure_row(model_name, loaded, tok, policy, budget, windows, lengths, trials, args)
                rows.append(row)
                save()
                ppl_txt = f"{row['perplexity']:9.3f}" if row["perplexity"] is not None else "        -"
                print(f"{model_name:8s} {policy:9s} {budget:5.2f}: ppl {ppl_txt}  passkey {row['passkey']}  "
                      f"({row['seconds']} s)", flush=True)
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
