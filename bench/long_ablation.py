"""Where long-context retrieval dies in a conversion: one change to the planner's plan per row, judged on the suite.

    python -m bench.long_ablation [--ratio 0.25] [--length 4096] [--trials 8] [--rows plan,bits16,...] [--name N]

SmolLM2-135M-Instruct, zero-shot. The planner picks its plan at --ratio from the default calibration (sampled text,
256-token sequences); each row then changes one thing and rebuilds from the same calibration (the calibration rows
recalibrate on text instead). Every row is judged on the same prompts as the source: the long-context suite at
--length tokens (haystack: Northanger Abbey; the converted models answer through the runtime, the source through
transformers' generate; accuracy, recall and paired McNemar p against the source), long-window
perplexity on Persuasion (--length windows scoring their last quarter, as a ratio to the source's), the frontier's
perplexity (Persuasion's first 20,480 tokens in 512-token windows) and held-out KL on sampled text. Results are written after every row to bench/results/<name>.json (default
long_ablation_smollm2_<ratio>), so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from bench.common import RESULTS, argument_parser, calibrated, data_file, write_result

TASKS = "single,multikey,multivalue,variables"


def rows(plan, full_width: int, layers: int, base=None):
    """(name, what changes, plan) of each row: changes of the planner's plan."""
    from kvconvert.convert.plan import plan_bytes, widest_latent

    one = tuple((i,) for i in range(layers))
    wide = min(2 * plan.latent_dim, full_width)
    same_bytes = {}
    if base is not None:
        for bits in (8, 16):
            p = replace(plan, kv_bits=bits, tail_dim=0)
            same_bytes[bits] = replace(p, latent_dim=widest_latent(base, p, plan_bytes(base, plan)))
    extra = {f"bytes{b}": (f"{b}-bit latent {p.latent_dim} wide (the plan's bytes)", p) for b, p in same_bytes.items()}
    return extra | {
        "keys4": ("keys weighted 4x in the latent fit", replace(plan, key_weight=4.0)),
        "keys0.5": ("keys weighted 0.5x in the latent fit", replace(plan, key_weight=0.5)),
        "keys0.25": ("keys weighted 0.25x in the latent fit", replace(plan, key_weight=0.25)),
        "keys0.125": ("keys weighted 0.125x in the latent fit", replace(plan, key_weight=0.125)),
        "keys16": ("keys weighted 16x in the latent fit", replace(plan, key_weight=16.0)),
    } | {
        "plan": ("the planner's plan", plan),
        "bits16": ("16-bit latent (same width)", replace(plan, kv_bits=16, tail_dim=0)),
        "bits8": ("8-bit latent (same width)", replace(plan, kv_bits=8, tail_dim=0)),
        "no_tail": ("4-bit latent, no 2-bit tail", replace(plan, tail_dim=0)),
        "no_rotation": ("no rotation before quantization", replace(plan, rotate=False)),
        "wide16": (f"16-bit latent {wide} wide", replace(plan, latent_dim=wide, kv_bits=16, tail_dim=0)),
        "full16": (f"16-bit latent, full width {full_width}", replace(plan, latent_dim=full_width, kv_bits=16, tail_dim=0)),
        "no_sharing": ("one layer per group (same width, bits)", replace(plan, groups=one)),
        "no_sharing16": ("one layer per group, 16-bit", replace(plan, groups=one, kv_bits=16, tail_dim=0)),
    }


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: all, plus cached, calib256, calib2048)")
    ap.add_argument("--windows", type=int, default=4, help="long-window perplexity windows")
    ap.add_argument("--name", default=None)
    ap.add_argument("--reuse-source", action="store_true", help="keep the source's figures of an earlier run with the same settings")
    ap.add_argument("--recall-only", action="store_true", help="no suite: each row's held-out KL and recall KL (one "
                    "2,048-token recall row), in seconds a row; writes long_ablation_recall_smollm2_<ratio>")
    args = ap.parse_args()
    if args.recall_only:
        return recall_only(args)

    import torch
    import torch.nn.functional as F

    from kvconvert.convert.build import Compressor
    from kvconvert.convert.calibrate import collect_inputs, tokens_from_text
    from kvconvert.convert.plan import Overrides, choose_plan, full_width, kl_to_source, plan_bytes
    from kvconvert.evaluate import read_text, runtime_generator, score_windows, text_windows
    from kvconvert.loading import load_any
    from kvconvert.longcontext import compare_suites, run_suite, text_sentences

    torch.manual_seed(0)
    name = args.name or f"long_ablation_smollm2_{args.ratio:g}"
    tasks = args.tasks.split(",")
    source = load_any("smollm2")
    tok = source.tokenizer
    haystack = text_sentences(read_text(data_file("austen_northangerabbey.txt", None)))
    windows = text_windows(tok, read_text(data_file("austen_persuasion.txt", None)), args.length,
                           args.length * args.windows)
    score_last = args.length // 4
    short = text_windows(tok, read_text(data_file("austen_persuasion.txt", None)), 512, 20480)  # the frontier's protocol
    result: dict = {"ratio": args.ratio, "length": args.length, "trials": args.trials, "tasks": tasks,
                    "haystack": "austen_northangerabbey.txt", "perplexity_text": "austen_persuasion.txt",
                    "score_last": score_last, "rows": []}

    def suite(model, generate=None):
        return run_suite(model, tok, tasks, [args.length], args.trials, sentences=haystack, generate=generate)

    t0 = time.perf_counter()
    previous = RESULTS / f"{name}.json"
    kept = json.loads(previous.read_text()) if args.reuse_source and previous.is_file() else {}
    same = all(kept.get(k) == result[k] for k in ("length", "trials", "tasks", "haystack", "score_last"))
    if kept.get("source") and same:
        result["source"] = kept["source"]
    else:
        ref_rows = suite(source.model)
        ref_ppl = score_windows(source.model, windows, batch_size=1, score_last=score_last)["perplexity"]
        result["source"] = {"suite": ref_rows, "long_perplexity": ref_ppl, "seconds": round(time.perf_counter() - t0, 1)}
    if "perplexity_512" not in result["source"]:
        result["source"]["perplexity_512"] = score_windows(source.model, short)["perplexity"]
    ref, ref_ppl = result["source"]["suite"], result["source"]["long_perplexity"]
    ref_short = result["source"]["perplexity_512"]
    print("source", [(r["task"], r["accuracy"], round(r["recall"], 3)) for r in ref], f"ppl {ref_ppl:.3f}", flush=True)
    write_result(name, result)

    comp, held = calibrated(source)
    report = choose_plan(comp, args.ratio, Overrides(), held, refine=False)  # the plan before the recall judge
    plan, base = report.plan, comp.base
    result["plan"] = plan.describe()
    table = rows(plan, full_width(base, plan), base.num_hidden_layers, base)
    wanted = args.rows.split(",") if args.rows else [*table, "cached", "calib256", "calib2048"]
    source_logp = F.log_softmax(source.model(held, use_cache=False).logits.float(), -1)
    text_comps = {}
    for row in wanted:
        t0 = time.perf_counter()
        c, p, model = comp, None, None
        if row in table:
            what, p = table[row]
        elif row.startswith("folder:"):  # a converted model, e.g. the default conversion (its own calibration)
            from kvconvert.loading import load_clla

            folder = row.split(":", 1)[1]
            model = load_clla(folder).model.eval()
            record = json.loads((Path(folder) / "conversion.json").read_text())
            what, p = f"kvconvert convert --kv-ratio {record.get('target_kv_ratio')} (its own calibration)", None
            entry_plan, entry_ratio = record["plan"], record["kv_ratio"]
        elif row == "mix8":
            from kvconvert.convert.plan import head8_mix, plan_bytes as pb

            what, p = "an 8-bit head of one quant group before a 4-bit tail (the plan's bytes)", head8_mix(base, plan, pb(base, plan), Overrides())
        elif row == "cached":
            what = "the planner's plan with cached rope keys"
            p = choose_plan(comp, args.ratio, Overrides(rope_keys="cached"), held, refine=False).plan
        elif row.startswith("calib"):
            seq = int(row[5:])
            what = f"the plan refitted on 3,072 text tokens (Emma) in {seq}-token sequences"
            if seq not in text_comps:
                text = read_text(data_file("austen_emma.txt", None))
                cal = collect_inputs(source.model, tokens_from_text(tok, text, 3072, seq), batch=1)
                text_comps[seq] = Compressor(source.model, "llama", "smollm2", cal)
            c, p = text_comps[seq], plan
        else:
            raise SystemExit(f"unknown row {row!r}: choose from {', '.join([*table, 'cached', 'calib256', 'calib2048'])}")
        if model is None:
            model = c.build(p).eval()
            entry_plan, entry_ratio = p.describe(), plan_bytes(base, p) / base.source_kv_bytes_per_token
        suite_rows = compare_suites(suite(model, runtime_generator(model, lambda: None)), ref)
        ppl = score_windows(model, windows, batch_size=1, score_last=score_last)["perplexity"]
        ppl_short = score_windows(model, short)["perplexity"]
        entry = {"row": row, "change": what, "plan": entry_plan, "kv_ratio": entry_ratio,
                 "heldout_kl": kl_to_source(model, held, source_logp), "long_perplexity": ppl,
                 "long_perplexity_ratio": ppl / ref_ppl, "perplexity_512": ppl_short,
                 "perplexity_512_ratio": ppl_short / ref_short, "suite": suite_rows, "seconds": round(time.perf_counter() - t0, 1)}
        result["rows"].append(entry)
        write_result(name, result)
        print(row, f"ratio {entry['kv_ratio']:.4f} kl {entry['heldout_kl']:.4f} ppl× {entry['long_perplexity_ratio']:.3f}"
              f" ppl512× {entry['perplexity_512_ratio']:.3f}",
              [(r["task"], r["accuracy"], round(r["recall"], 3)) for r in suite_rows], flush=True)


def recall_only(args) -> None:
    """Held-out KL and recall KL of every row (what the planner's judge sees), without the suite."""
    import torch.nn.functional as F

    from kvconvert.convert.plan import Overrides, RecallProbe, choose_plan, full_width, head8_mix, kl_to_source, plan_bytes
    from kvconvert.loading import load_any

    source = load_any("smollm2")
    comp, held = calibrated(source)
    plan = choose_plan(comp, args.ratio, Overrides(), held, refine=False).plan
    base = comp.base
    table = rows(plan, full_width(base, plan), base.num_hidden_layers, base)
    mix = head8_mix(base, plan, plan_bytes(base, plan), Overrides())  # None unless the plan is all 4-bit
    if mix is not None:
        table["mix8"] = ("an 8-bit head of one quant group before a 4-bit tail", mix)
        table["mix8_keys0.25"] = ("the 8-bit head, keys weighted 0.25x", replace(mix, key_weight=0.25))
    probe = RecallProbe.build(held[0], comp.cal.tokens, 2048)
    probe_logp = probe.logp(source.model)
    source_logp = F.log_softmax(source.model(held, use_cache=False).logits.float(), -1)
    result = {"ratio": args.ratio, "plan": plan.describe(), "probe_tokens": probe.tokens.shape[1], "rows": []}
    for row in args.rows.split(",") if args.rows else table:
        if row not in table:
            raise SystemExit(f"unknown row {row!r} for this plan: choose from {', '.join(table)}")
        what, p = table[row]
        model = comp.build(p).eval()
        entry = {"row": row, "change": what, "plan": p.describe(), "kv_ratio": plan_bytes(base, p) / base.source_kv_bytes_per_token,
                 "heldout_kl": kl_to_source(model, held, source_logp), "recall_kl": probe.kl(model, probe_logp)}
        result["rows"].append(entry)
        write_result(args.name or f"long_ablation_recall_smollm2_{args.ratio:g}", result)
        print(row, f"ratio {entry['kv_ratio']:.4f} held-out KL {entry['heldout_kl']:.4f} recall KL {entry['recall_kl']:.4f}", flush=True)


if __name__ == "__main__":
    main()
