"""What long calibration rows change: the planner's plan and its fit, on short rows alone and with long rows beside.

    python -m bench.studies.long_calibration [--ratio 0.10] [--long-rows 2] [--probes 6] [--tasks 8] [--text FILE]

SmolLM2-135M-Instruct, zero-shot. `kvconvert convert`'s calibration rows (sampled text and chats, 256-token rows)
are drawn once, and statistics are collected twice: on the short rows alone (`--calib-long-rows 0`) and with
--long-rows rows of 4,096 tokens packed from the same text beside them (the default). On each, the planner picks its
plan by held-out KL plus the KL on one recall row (the judge `convert` had before its four-row probe, kept here to
show what it chose); then every plan is fitted on every calibration (2 x 2), so what the layout does and what the
statistics do come apart. Each fit is scored against the source on: held-out KL (the
planner's 512 held-out tokens); recall KL, the mean over --probes recall probes of 2,048 tokens (each repeating
another row sampled apart from the calibration); task KL, on --tasks long-context trials of 4,096 tokens (the
suite's four tasks in turn; haystack of sampled text; seeds far from the suite's), the KL and the share of the
source's top-1 token kept on the answer tokens, teacher-forced; and perplexity on --text (default Persuasion) in
512-token windows (the first 20,480 tokens) and in 4 windows of 4,096 scoring their last quarter, as ratios to the
source's. Writes bench/results/long_calibration_smollm2_<ratio>.json after every row.
"""

from __future__ import annotations

import time

from bench.common import argument_parser, data_file, write_result

PROBE_LEN = 2048
SEQ = 256


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--ratio", type=float, default=0.10)
    ap.add_argument("--long-rows", type=int, default=2)
    ap.add_argument("--probes", type=int, default=6)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--text", default=None, help="default: ../shared/data/austen_persuasion.txt")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from kvconvert.convert.build import Compressor
    from kvconvert.convert.calibrate import collect_inputs, long_calibration_rows, sample_tokens
    from kvconvert.convert.pipeline import RECALL_PROBE_TOKENS, ConvertOptions, calibration_tokens, row_length
    from kvconvert.convert.plan import Overrides, RecallProbe, choose_plan, kl_to_source, plan_bytes
    from kvconvert.distill.data import TASK_SEED, long_rows
    from kvconvert.evaluate import read_text, score_windows, text_windows
    from kvconvert.loading import load_any

    t0 = time.perf_counter()
    name = args.name or f"long_calibration_smollm2_{args.ratio:g}"
    source = load_any("smollm2")
    model, tok = source.model, source.tokenizer
    opts = ConvertOptions(kv_ratio=args.ratio)
    calib, held, origin, stream, lead = calibration_tokens(source, opts)
    length = row_length(source, opts.long_len)

    # judged apart from the calibration: rows sampled with another seed make the recall probes (A_i, shared filler,
    # A_i) and the haystacks of the task trials
    extra = sample_tokens(model, tok, (args.probes + 2 * PROBE_LEN // SEQ) * SEQ, SEQ, seed=1_000_003)
    heads, filler = extra[: args.probes], extra[args.probes :]
    probes = [RecallProbe.build(h, filler, PROBE_LEN) for h in heads]
    tasks, answers = long_rows(filler[:, 2:], args.tasks, length, TASK_SEED + 77, tok, recall_share=0, task_share=1)
    with torch.no_grad():
        probe_logp = [p.logp(model) for p in probes]
        held_logp = F.log_softmax(model(held, use_cache=False).logits.float(), -1)
        task_logp = [F.log_softmax(model(t[None], use_cache=False).logits[0, :-1].float(), -1) for t in tasks]
    text = read_text(data_file("austen_persuasion.txt", args.text))
    short_windows = text_windows(tok, text, 512, 20480)
    long_windows = text_windows(tok, text, length, 4 * length)
    ref_short = score_windows(model, short_windows)["perplexity"]
    ref_long = score_windows(model, long_windows, batch_size=1, score_last=length // 4)["perplexity"]
    result = {"ratio": args.ratio, "calibration": origin, "short_tokens": int(calib.numel()), "long_rows": args.long_rows,
              "long_len": length, "probes": args.probes, "probe_tokens": PROBE_LEN, "task_trials": args.tasks,
              "text": str(args.text or "austen_persuasion.txt"),
              "judge": "held-out KL + one recall row of 2,048 tokens (held-out row 0, calibration filler)", "source": {"perplexity_512": ref_short, "long_perplexity": ref_long}, "plans": {}, "rows": []}

    @torch.no_grad()
    def task_scores(student) -> tuple[float, float]:
        """(KL, share of the source's top-1 kept) on the trials' answer tokens, teacher-forced."""
        kls, kept = [], []
        for t, mask, ref in zip(tasks, answers, task_logp):
            logp = F.log_softmax(student(t[None], use_cache=False).logits[0, :-1].float(), -1)
            at = mask[1:]  # logits at position i predict token i + 1
            kls.append((ref[at].exp() * (ref[at] - logp[at])).sum(-1).mean().item())
            kept.append((logp[at].argmax(-1) == ref[at].argmax(-1)).float().mean().item())
        return sum(kls) / len(kls), sum(kept) / len(kept)

    fits = {}
    for label, n in (("short only", 0), (f"short + {args.long_rows} long", args.long_rows)):
        long = long_calibration_rows(stream, n, length, SEQ, opts.seed, tok, lead) if n else None
        comp = Compressor(model, "llama", "smollm2", collect_inputs(model, calib, long=long))
        probe = RecallProbe.build(held[0], calib, min(RECALL_PROBE_TOKENS, length))
        plan = choose_plan(comp, args.ratio, Overrides(), held, probe=probe).plan  # the one-row judge
        fits[label] = (comp, plan)
        result["plans"][label] = plan.describe()
        print(f"{label}: {plan.describe()}", flush=True)
    for plan_of, (_, plan) in fits.items():
        for label, (comp, _) in fits.items():
            t = time.perf_counter()
            student = comp.build(plan).eval()
            with torch.no_grad():
                recall = [p.kl(student, lp) for p, lp in zip(probes, probe_logp)]
                task_kl, task_top1 = task_scores(student)
                entry = {
                    "plan_of": plan_of, "calibration": label, "plan": plan.describe(),
                    "kv_ratio": plan_bytes(comp.base, plan) / comp.base.source_kv_bytes_per_token,
                    "heldout_kl": kl_to_source(student, held, held_logp),
                    "recall_kl": sum(recall) / len(recall), "recall_kl_per_probe": recall,
                    "task_kl": task_kl, "task_top1_kept": task_top1,
                    "perplexity_512_ratio": score_windows(student, short_windows)["perplexity"] / ref_short,
                    "long_perplexity_ratio": score_windows(student, long_windows, batch_size=1,
                                                           score_last=length // 4)["perplexity"] / ref_long,
                    "seconds": round(time.perf_counter() - t, 1),
                }
            result["rows"].append(entry)
            result["total_s"] = round(time.perf_counter() - t0, 1)
            write_result(name, result)
            print(f"plan of {plan_of}, fitted on {label}: held-out KL {entry['heldout_kl']:.4f} recall KL "
                  f"{entry['recall_kl']:.4f} task KL {task_kl:.4f} top-1 kept {task_top1:.3f} ppl512x "
                  f"{entry['perplexity_512_ratio']:.3f} long pplx {entry['long_perplexity_ratio']:.3f}", flush=True)


if __name__ == "__main__":
    main()
