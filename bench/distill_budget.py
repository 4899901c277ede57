"""Convert and distill within a time budget, then evaluate: the issues' "within N minutes" runs as one command.

    python -m bench.distill_budget                 # one GPU: 0.05 and 0.02, 7 minutes of converting and distilling
    python -m bench.distill_budget --cpu           # the CPU-sized run: 0.05, 60 minutes, Austen text, 4,096 tokens

For each ratio in turn: `kvconvert convert smollm2 --kv-ratio R`, then `kvconvert distill` from it on as many tokens
as the budget left to that ratio allows, then bench.distill's evaluation (perplexity on Persuasion, which no run
trains on; top-1 and KL against the source; passkey; the long-context suite paired with the source; chat
agreement). A ratio's budget is what is left of --minutes split evenly over the ratios still to run, its conversion
counted in it. Its tokens: a probe of --probe-steps training steps on random ids gives the step time; the steps that
fit the time left, less a share for what a run does beside its steps (sampling the teacher, validation: OVERHEAD
for the first ratio, then the share the previous ratio measured). Evaluation is not in the budget (the issues'
targets count converting and distilling); its time is recorded, and `wall_s` is the whole command's.
Writes bench/results/distill_budget_<gpu|cpu>.json (or --name).
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import argument_parser, data_file, peak_memory, write_result
from bench.distill import AUSTEN_TRAIN, Scorer
from bench.distill_speed import random_ids

OVERHEAD = 0.15  # the first ratio's share of its distillation time outside the training steps (assumed)


def probe_step_s(folder: Path, opts, steps: int, world) -> float:
    """Seconds per optimizer step of `kvconvert distill`'s loop at `opts`' shapes, from `steps` steps on random ids:
    the median after the first when there are three or more (the first pays for allocation and compilation), else
    the loop's own step time (validation and saving left out)."""
    from kvconvert.distill.train import train
    from kvconvert.loading import load_any, load_clla

    student, teacher = load_clla(folder).model, load_any("smollm2").model
    probe = replace(opts, tokens=steps * opts.batch_size * opts.seq_len, val_tokens=opts.seq_len,
                    eval_every=10**9, save_every=10**9)
    data = random_ids(student.config.vocab_size, opts, steps)
    stamps, rate = [], []
    with tempfile.TemporaryDirectory() as tmp:
        train(student, teacher, data, probe, Path(tmp), world, "smollm2",
              progress=lambda s, n, m: (stamps.append(time.perf_counter()), rate.append(m["tokens_per_s"])))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2, 3, ...: nothing but the step between the calls
    return statistics.median(gaps) if len(gaps) >= 2 else opts.batch_size * opts.seq_len / rate[-1]


def plan_steps(seconds: float, step_s: float, overhead: float) -> int:
    """Optimizer steps that fit `seconds` when `overhead` of a run's time goes beside its steps."""
    return max(1, math.floor(seconds * (1 - overhead) / step_s))


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--cpu", action="store_true",
                    help="the CPU-sized run: --ratios 0.05 --minutes 60 --long-trials 6 (Austen text, 4,096 tokens)")
    ap.add_argument("--ratios", default="0.05,0.02")
    ap.add_argument("--minutes", type=float, default=7.0, help="converting and distilling, all ratios together")
    ap.add_argument("--data", default="austen", choices=["austen", "sampled"])
    ap.add_argument("--seq-len", type=int, default=0, help="0: kvconvert distill's default")
    ap.add_argument("--batch-size", type=int, default=0, help="0: kvconvert distill's default")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--probe-steps", type=int, default=0, help="0: 3 on GPU, 1 on CPU")
    ap.add_argument("--evals", type=int, default=3, help="validations during each run, besides the first")
    ap.add_argument("--eval-tokens", type=int, default=20480, help="of Persuasion, in 512-token windows")
    ap.add_argument("--passkey-trials", type=int, default=5)
    ap.add_argument("--long-trials", type=int, default=10, help="trials per task of the long-context suite at 4k")
    ap.add_argument("--chat-prompts", type=int, default=24)
    ap.add_argument("--eval-zero-shot", action="store_true", help="also evaluate each conversion before distilling")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.cpu:
        args.ratios, args.minutes, args.long_trials = "0.05", 60.0, 6
    if args.minutes <= 0:
        ap.error("--minutes must be positive")
    started = time.perf_counter()

    import torch

    from kvconvert.cli.common import return_freed_memory
    from kvconvert.convert.pipeline import ConvertOptions, convert
    from kvconvert.distill import dist
    from kvconvert.distill.run import distill_folder
    from kvconvert.distill.train import DistillOptions, resolve_lengths
    from kvconvert.evaluate import read_text, text_windows
    from kvconvert.loading import load_any, load_clla

    return_freed_memory()  # as `kvconvert convert` and `distill` do
    world = dist.World()
    device = world.device
    cuda = device.startswith("cuda")
    probe_steps = args.probe_steps or (3 if cuda else 1)
    source = load_any("smollm2")
    source.model.to(device)
    windows = text_windows(source.tokenizer, read_text(data_file("austen_persuasion.txt", None)), 512, args.eval_tokens)
    scorer = Scorer(source.tokenizer, windows, args.passkey_trials, args.long_trials, 4096, args.chat_prompts)
    print("source ...", flush=True)
    src_row = scorer(source.model, None)
    scorer.reference_suite = src_row.get("long_suite")
    austen = [data_file(f, None) for f in AUSTEN_TRAIN] if args.data == "austen" else []
    ratios = [float(r) for r in args.ratios.split(",")]
    settings = vars(args) | {"device": device, "probe_steps": probe_steps, "train_files": AUSTEN_TRAIN if austen else []}
    rows: list[dict] = []
    save = lambda: write_result(args.name or f"distill_budget_{'gpu' if cuda else 'cpu'}",  # noqa: E731
                                {"source": src_row, "rows": rows, "settings": settings,
                                 "wall_s": round(time.perf_counter() - started, 1)})
    budget_left, overhead = args.minutes * 60, OVERHEAD
    work = Path(tempfile.mkdtemp(prefix="kvconvert-budget-"))
    try:
        for i, ratio in enumerate(ratios):
            budget = budget_left / (len(ratios) - i)
            t0 = time.perf_counter()
            zs = work / f"r{ratio}-zero-shot"
            record = convert("smollm2", zs, ConvertOptions(kv_ratio=ratio))
            convert_s = time.perf_counter() - t0
            row = {"kv_ratio_target": ratio, "kv_ratio": record["kv_ratio"], "plan": record["plan"],
                   "budget_s": round(budget, 1), "convert_s": round(convert_s, 1)}
            zero_shot_s = 0.0
            if args.eval_zero_shot:
                row["zero_shot"] = scorer(load_clla(zs).model.to(device), source.model)
                zero_shot_s = time.perf_counter() - t0 - convert_s
            t1 = time.perf_counter()
            base = DistillOptions(tokens=1, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                                  device=device)
            shapes = resolve_lengths(base, source.model.config.max_position_embeddings, device)
            step_s = probe_step_s(zs, shapes, probe_steps, world)
            probe_s = time.perf_counter() - t1
            steps = plan_steps(budget - convert_s - probe_s, step_s, overhead)
            step_tokens = shapes.batch_size * shapes.seq_len
            opts = replace(base, tokens=steps * step_tokens, eval_every=max(1, -(-steps // args.evals)),
                           save_every=10**9, data=austen, sample_tokens=min(1_000_000, steps * step_tokens))
            out = work / f"r{ratio}-distilled"
            print(f"{ratio}: converted in {convert_s:.0f} s; a step {step_s:.2f} s (probe {probe_s:.0f} s); "
                  f"{steps} steps of {step_tokens:,} tokens for the {budget - convert_s - probe_s:.0f} s left",
                  flush=True)
            t2 = time.perf_counter()
            with peak_memory(device) as memory:
                rec = distill_folder(zs, "smollm2", opts, out=out, log=lambda m: print("  " + m, flush=True))
            distill_s = time.perf_counter() - t2
            d = rec["distill"][-1]
            overhead = min(0.5, max(0.0, 1 - d["steps"] * step_s / distill_s))  # for the next ratio
            used = time.perf_counter() - t0 - zero_shot_s  # converting, probing and distilling
            budget_left -= used
            row |= {"step_s": round(step_s, 3), "probe_s": round(probe_s, 1), "steps": d["steps"],
                    "tokens": d["tokens"], "distill_s": round(distill_s, 1), "train_loop_s": d["seconds"],
                    "tokens_per_s": d["tokens_per_s"], "overhead_share": round(overhead, 3),
                    "used_s": round(used, 1), "within_budget": used <= budget, "best_step": d["best"]["step"],
                    "validation": d["validation"], "memory": memory}
            t3 = time.perf_counter()
            row |= scorer(load_clla(out).model.to(device), source.model)
            row["score_s"] = round(time.perf_counter() - t3, 1)
            rows.append(row)
            save()
            shutil.rmtree(out, ignore_errors=True)
            chat = row.get("chat", {}).get("top1_agreement")
            print(f"{ratio}: {d['tokens']:,} tokens in {distill_s:.0f} s, used {used:.0f} of {budget:.0f} s; "
                  f"perplexity {row['perplexity']:.2f} ({row['perplexity'] / src_row['perplexity']:.3f}x), top-1 "
                  f"{row['top1_agreement']:.1%}" + (f", chat {chat:.1%}" if chat is not None else ""), flush=True)
            del rec
            if cuda:
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {save()} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
