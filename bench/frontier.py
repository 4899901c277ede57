"""Zero-shot CLLA conversion of SmolLM2-135M-Instruct across KV ratios, and an ablation at 0.05.

    python -m bench.frontier [--ratios 0.25,0.10,0.05,0.02] [--text FILE] [--passkey-trials 5] [--skip-ablation]
    python -m bench.frontier --ablation-only     # rerun the ablation, keep the rows of the existing JSON

For each ratio: `kvconvert convert smollm2 --kv-ratio R` (timed, default sampled calibration), then perplexity on
the text (first 20,480 tokens, 512-token windows, kvconvert.evaluate's protocol), top-1 agreement and KL
against the source, passkey accuracy at 1k and 4k tokens, KV bytes per token. The ablation rebuilds the 0.05 plan
with plain weight SVD and without the rotation, and re-plans with rope keys cached beside the latent (RoPE pairs
selected, then without the selection), with one layer per group and without 2-bit tails (equal bits throughout the latent); at 0.10 it compares the planner with and without its prefix layouts (first layers in finer groups).
Writes bench/results/frontier_smollm2.json and bench/results/frontier_smollm2.png.
"""

from __future__ import annotations

import argparse
import math
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import RESULTS, argument_parser, calibrated, data_file, long_suite, write_result


def evaluate(model, tokenizer, windows, reference, trials: int) -> dict:
    from kvconvert.evaluate import passkey_accuracy, score_windows

    t = time.perf_counter()
    text = score_windows(model, windows, reference=reference)
    passkey = passkey_accuracy(model, tokenizer, [1024, 4096], trials=trials)
    return text | {"passkey": {p["length"]: p["accuracy"] for p in passkey}, "eval_s": round(time.perf_counter() - t, 1)}


def parse_args() -> argparse.Namespace:
    ap = argument_parser(__doc__)
    ap.add_argument("--ratios", default="0.25,0.10,0.05,0.02")
    ap.add_argument("--text", default=None, help="default: ../shared/data/austen_persuasion.txt")
    ap.add_argument("--max-tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--passkey-trials", type=int, default=5)
    ap.add_argument("--long-trials", type=int, default=0, help="trials per task of the long-context suite at 4k, "
                    "paired against the source (0: none; each converted model answers through the runtime: slow on CPU)")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--rope-keys", default=None, help="cached, latent or auto (kvconvert convert --rope-keys; default: its default)")
    ap.add_argument("--rope-dim", type=int, default=None, help="RoPE dims per rope head (kvconvert convert --rope-dim; "
                    "default: the planner's): fewer rebuilt dims cost less decode compute")
    ap.add_argument("--name", default="frontier_smollm2", help="result JSON (and PNG) name under bench/results")
    ap.add_argument("--merge", action="store_true", help="rerun only --ratios and replace their rows in the existing JSON "
                    "(the source row and the ablation are kept, with a record of what was rerun and when)")
    ap.add_argument("--ablation-only", action="store_true", help="rerun only the ablation; the rows of the existing JSON "
                    "are kept, with a record of when the ablation was rerun")
    args = ap.parse_args()
    if args.merge and args.ablation_only:
        sys.exit("error: --merge reruns rows, --ablation-only the ablation: give one")
    return args


def measure_ratios(source, windows, ratios: list[float], rope_keys: str | None, trials: int, base_ppl: float,
                   long_trials: int = 0, reference_suite: list[dict] | None = None, rope_dim: int | None = None
                   ) -> list[dict]:
    """One row per ratio: `kvconvert convert smollm2 --kv-ratio R` (timed), then the model evaluated against the source."""
    from kvconvert.convert.pipeline import ConvertOptions, convert
    from kvconvert.convert.plan import Overrides
    from kvconvert.loading import load_clla

    rows = []
    tmp = Path(tempfile.mkdtemp())
    try:
        for ratio in ratios:
            out = tmp / f"r{ratio}"
            t = time.perf_counter()
            ov = Overrides(rope_keys=rope_keys, rope_dim=rope_dim)
            record = convert("smollm2", out, ConvertOptions(kv_ratio=ratio, overrides=ov,
                                                            log=lambda m: print("  " + m, flush=True)))
            wall = time.perf_counter() - t
            model = load_clla(out).model
            row = {"name": f"CLLA {ratio:g}", "target": ratio, "kv_ratio": record["kv_ratio"], "kv_bytes_per_token": record["kv_bytes_per_token"],
                   "plan": record["plan"], "conversion_s": round(wall, 1), "conversion_timings_s": record["timings_s"],
                   "judge_dtype": record.get("judge_dtype", "float32")}  # conversions before --judge-dtype: float32
            row |= evaluate(model, source.tokenizer, windows, source.model, trials)
            if long_trials:
                row["long_suite"] = long_suite(model, source.tokenizer, 4096, long_trials, reference_suite)
            rows.append(row)
            print(f"{row['name']}: ratio {row['kv_ratio']:.4f} ppl {row['perplexity']:.2f} ({row['perplexity'] / base_ppl:.2f}x) "
                  f"top1 {row['top1_agreement']:.3f} kl {row['kl']:.3f} passkey {row['passkey']} convert {wall:.0f}s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def ablation_plans(comp, held) -> tuple[dict, list[dict]]:
    """({variant: plan}, rows of variants that cannot be planned): the 0.05 plan and its ablations, and the 0.10 plan
    with and without prefix layouts."""
    from kvconvert.convert.plan import Overrides, choose_plan, smallest_ratio
    from kvconvert.errors import KvconvertError

    unreachable = []
    plan = choose_plan(comp, 0.05, Overrides(), held).plan
    cached = choose_plan(comp, 0.05, Overrides(rope_keys="cached"), held).plan
    variants = {
        "full method": plan,
        "rope keys cached beside the latent, RoPE pairs selected (re-planned)": cached,
        "rope keys cached, no RoPE pair selection (highest frequencies kept)": replace(cached, select_rope=False),
        "plain weight SVD (not activation-aware)": replace(plan, activation_aware=False),
        "no rotation before quantization": replace(plan, rotate=False),
        "no 2-bit tail (re-planned with equal bits throughout the latent)": choose_plan(
            comp, 0.05, Overrides(tail_dim=0), held).plan,
    }
    try:
        variants["one layer per group (re-planned)"] = choose_plan(comp, 0.05, Overrides(group_size=1), held).plan
    except KvconvertError as e:  # one layer per group may not fit 5% at all: say so, and show its nearest plan
        reach = smallest_ratio(comp.base, Overrides(group_size=1))
        unreachable.append({"variant": "one layer per group at 0.05", "unreachable": str(e)})
        nearest = choose_plan(comp, reach * 1.001, Overrides(group_size=1), held).plan
        variants[f"one layer per group (smallest plan, ratio {reach:.4f})"] = nearest
    # The prefix layouts earn their place below 0.25, where groups must share: the 0.10 plan with and without them.
    variants["0.10, planned"] = choose_plan(comp, 0.10, Overrides(), held).plan
    variants["0.10, planned from uniform layouts only (no prefix layouts)"] = choose_plan(comp, 0.10, Overrides(), held, prefix=False).plan
    return variants, unreachable


def measure_ablation(source, windows) -> list[dict]:
    """Each ablation variant built from the calibrated source and scored against it (no passkey)."""
    from kvconvert.convert.plan import plan_bytes
    from kvconvert.evaluate import score_windows

    comp, held = calibrated(source)
    variants, ablation = ablation_plans(comp, held)
    for name, p in variants.items():
        model = comp.build(p)
        r = score_windows(model, windows, reference=source.model)
        ablation.append({"variant": name, "plan": p.describe(), "kv_ratio": plan_bytes(comp.base, p) / 23040} | r)
        print(f"ablation {name}: ppl {r['perplexity']:.2f} top1 {r['top1_agreement']:.3f} kl {r['kl']:.3f}", flush=True)
    return ablation


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def write_merged(name: str, previous: dict, rows: list[dict], meta: dict) -> None:
    """--merge: the rerun rows replace theirs in the previous JSON, the rest is kept with a record of the rerun."""
    fresh = {r["name"]: r for r in rows[1:]}
    kept = [r for r in previous["rows"][1:] if r["name"] not in fresh]
    rows = rows[:1] + sorted(kept + list(fresh.values()), key=lambda r: -r["kv_ratio"])
    merged = previous.get("merged", []) + [{"rows": sorted(fresh), "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}]
    kept_fields = {k: v for k, v in previous.items() if k != "environment"}
    path = write_result(name, kept_fields | meta | {"rows": rows, "merged": merged,
                        "previous_environment": previous["environment"]})
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {path}")


def main() -> None:
    args = parse_args()
    previous = None
    if args.merge or args.ablation_only:
        previous = json.loads((RESULTS / f"{args.name}.json").read_text())
        args.skip_ablation = args.merge
    text_path = data_file("austen_persuasion.txt", args.text)

    from kvconvert.evaluate import read_text, text_windows
    from kvconvert.loading import load_any

    source = load_any("smollm2")
    windows = text_windows(source.tokenizer, read_text(text_path), args.window, args.max_tokens)
    if args.merge:
        rows = previous["rows"][:1]
    elif args.ablation_only:
        rows = previous["rows"]
    else:
        print("source ...", flush=True)
        rows = [{"name": "source", "kv_ratio": 1.0, "kv_bytes_per_token": 23040} | evaluate(source.model, source.tokenizer, windows, None, args.passkey_trials)]
    if args.long_trials and len(rows[0].get("long_suite", [{}])[0].get("passed", [])) != args.long_trials:
        rows[0]["long_suite"] = long_suite(source.model, source.tokenizer, 4096, args.long_trials)
    base_ppl = rows[0]["perplexity"]
    print(f"source: ppl {base_ppl:.2f} passkey {rows[0]['passkey']}", flush=True)
    ratios = [] if args.ablation_only else [float(r) for r in args.ratios.split(",")]
    rows = rows + measure_ratios(source, windows, ratios, args.rope_keys, args.passkey_trials, base_ppl,
                                 args.long_trials, rows[0].get("long_suite"), args.rope_dim)

    meta = {"text": text_path.name, "max_tokens": args.max_tokens, "window": args.window, "passkey_trials": args.passkey_trials}
    if args.merge:
        write_merged(args.name, previous, rows, meta)
        return
    if args.ablation_only:
        meta = {k: v for k, v in previous.items() if k not in ("environment", "ablation_at_0.05")} | {
            "rows_environment": previous.get("rows_environment", previous["environment"]),
            "ablation_rerun": {"commit": git_commit(), "date": time.strftime("%Y-%m-%d")}}
    else:
        write_result(args.name, meta | {"rows": rows, "ablation_at_0.05": []})  # kept if the ablation fails
        plot(rows, RESULTS / f"{args.name}.png")
    ablation = [] if args.skip_ablation else measure_ablation(source, windows)
    path = write_result(args.name, meta | {"rows": rows, "ablation_at_0.05": ablation})
    print(f"wrote {path}")


def long_share(row: dict) -> float | None:
    """The row's long-context suite accuracy as a share of the source's: the trials it passed over those the source
    passed, over the tasks where the source passed any (pooled, so that one task the source nearly always fails does
    not swing the share: multi-key 2 of 6 against the source's 1 of 6 is twice the source's)."""
    tasks = [t for t in row.get("long_suite", []) if t.get("reference_accuracy")]
    if not tasks:
        return None
    return sum(t["accuracy"] * t["trials"] for t in tasks) / sum(t["reference_accuracy"] * t["trials"] for t in tasks)


def plot(rows: list[dict], path: Path) -> None:
    """Two panels against the KV ratio: perplexity (512-token windows) over the source's; long context: the suite's
    accuracy at 4k as a share of the source's where it was measured (--long-trials), and passkey accuracy at 1k and
    4k."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    base = rows[0]["perplexity"]
    pts = sorted((r["kv_ratio"], r["perplexity"] / base) for r in rows[1:])
    ticks = [p[0] for p in pts]
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="kvconvert zero-shot")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="source")
    ax.set_yscale("log")
    ax.set_ylabel("perplexity / source perplexity")
    ax.set_title("SmolLM2-135M, Persuasion, zero-shot")
    for length, style in (("4096", "o-"), ("1024", "s:")):
        acc = sorted((r["kv_ratio"], r["passkey"].get(length, r["passkey"].get(int(length))))
                     for r in rows[1:] if "passkey" in r)
        lx.plot([a[0] for a in acc], [a[1] for a in acc], style, label=f"passkey at {int(length):,} tokens")
    suite = sorted((r["kv_ratio"], long_share(r)) for r in rows[1:] if long_share(r) is not None)
    if suite:
        lx.plot([a[0] for a in suite], [a[1] for a in suite], "D-", label="suite at 4k, share of the source's accuracy")
    lx.axhline(1.0, color="gray", lw=0.8, ls="--")
    lx.set_ylim(-0.05, max([1.1] + [a[1] + 0.1 for a in suite]))
    lx.set_ylabel("accuracy")
    lx.set_title("long context (zero-shot)")
    for a in (ax, lx):
        a.set_xscale("log")
        a.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
        a.minorticks_off()
        a.set_xlabel("KV cache / source KV cache")
        a.legend(fontsize=8)
    top = max(p[1] for p in pts)
    steps = [2.0**k for k in range(0, max(1, math.ceil(math.log2(max(top, 1.0)))) + 1)]
    ax.set_yticks(steps, [f"{y:g}×" for y in steps])  # after minorticks_off: a log axis alone labels only 10^0
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if sys.argv[1:] == ["--plot-only"]:  # redraw the PNG from the JSON
        plot(json.loads((RESULTS / "frontier_smollm2.json").read_text())["rows"], RESULTS / "frontier_smollm2.png")
    else:
        main()
