"""Distillation of zero-shot CLLA conversions of SmolLM2-135M-Instruct: quality vs training tokens.

    python -m bench.distill                      # GPU grid: ratios 0.05,0.02 × tokens 5M,20M,50M × data sampled,austen
    python -m bench.distill --cpu                # the CPU-sized run: 0.05, data-free, 4,096-token sequences
    python -m bench.distill --ratios 0.05 --tokens 1M --data sampled --long-trials 4

For each ratio: `kvconvert convert smollm2 --kv-ratio R` (zero-shot, evaluated as the 0-token row), then for each
data mode and token budget `kvconvert distill` from that zero-shot model (a fresh run per budget: the cosine
schedule depends on it). Data modes: `sampled` (data-free: the teacher's samples, packed into --seq-len sequences
with recall and long-context task rows beside them) and `austen` (the five Austen novels other than Persuasion).
Each model: perplexity on Persuasion (first 20,480 tokens, 512-token windows), top-1 agreement and KL against the
source, passkey accuracy at 1k and 4k, the long-context suite at --long-length (every task, --long-trials trials,
Northanger Abbey as haystack, paired against the source), chat agreement with the source (teacher-forced top-1 along its
greedy answers to --chat-prompts built-in prompts), training time.
Writes bench/results/distill_smollm2[_cpu].json and a plot of perplexity vs distillation tokens (PNG).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, argument_parser, data_file, peak_memory, write_result
from bench.frontier import evaluate


AUSTEN_TRAIN = ["austen_emma.txt", "austen_mansfieldpark.txt", "austen_northangerabbey.txt",
                "austen_prideprejudice.txt", "austen_sensesensibility.txt"]


def parse_tokens(spec: str) -> list[int]:
    mult = {"k": 1_000, "M": 1_000_000}
    return [int(float(x[:-1]) * mult[x[-1]]) if x[-1] in mult else int(x) for x in spec.split(",")]


def plot(rows: list[dict], base_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    run = lambda r: (r["kv_ratio_target"], r["data"], r["train"], r["hidden_weight"], r["lr"])  # noqa: E731
    for key in sorted({run(r) for r in rows if r["tokens"] > 0}):
        pts = sorted((r["tokens"], r["perplexity"] / base_ppl) for r in rows
                     if r["kv_ratio_target"] == key[0] and (r["tokens"] == 0 or run(r) == key))
        label = f"kv-ratio {key[0]}, {key[1]}, train {key[2]}, lr {key[4]:g}" + (f", hidden {key[3]:g}" if key[3] else "")
        ax.plot([max(t, 1e4) for t, _ in pts], [p for _, p in pts], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distillation tokens (zero-shot plotted at 1e4)")
    ax.set_ylabel("perplexity / source perplexity (Persuasion)")
    ax.set_title("SmolLM2-135M CLLA: quality vs distillation tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class Scorer:
    """Scores a model against the source: perplexity, top-1 and KL on the evaluation windows, passkey at 1k and 4k, the
    long-context suite at `long_length` (paired against the source's rows once `reference_suite` holds them) and chat
    agreement (`chat_prompts` built-in prompts, against `ref`)."""

    def __init__(self, tokenizer, windows, passkey_trials: int, long_trials: int, long_length: int, chat_prompts: int):
        self.tokenizer, self.windows = tokenizer, windows
        self.passkey_trials, self.long_trials, self.long_length = passkey_trials, long_trials, long_length
        self.chat_prompts = chat_prompts
        self.reference_suite: list[dict] | None = None

    def __call__(self, model, ref) -> dict:
        from bench.common import long_suite
        from kvconvert.chat_fidelity import chat_agreement

        row = evaluate(model, self.tokenizer, self.windows, ref, self.passkey_trials)
        if self.long_trials:
            t = time.perf_counter()
            row["long_suite"] = long_suite(model, self.tokenizer, self.long_length, self.long_trials,
                                           self.reference_suite)
            row["long_suite_s"] = round(time.perf_counter() - t, 1)
        if self.chat_prompts and ref is not None:
            t = time.perf_counter()
            chat = chat_agreement(model, ref, self.tokenizer, self.chat_prompts)
            row["chat"] = {k: chat[k] for k in ("top1_agreement", "first_sentence_match", "answer_tokens")}
            row["chat_s"] = round(time.perf_counter() - t, 1)
        return row


def parse_args() -> argparse.Namespace:
    ap = argument_parser(__doc__)
    ap.add_argument("--cpu", action="store_true", help="the CPU-sized run: --ratios 0.05 --tokens 64k --data sampled")
    ap.add_argument("--ratios", default="0.05,0.02")
    ap.add_argument("--tokens", default="5M,20M,50M")
    ap.add_argument("--data", default="sampled,austen", help="comma-separated: sampled, austen")
    ap.add_argument("--text", default=None, help="evaluation text; default ../shared/data/austen_persuasion.txt")
    ap.add_argument("--seq-len", type=int, default=0, help="0: kvconvert distill's default (the positions, at most 4,096)")
    ap.add_argument("--batch-size", type=int, default=0, help="0: kvconvert distill's default")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", default="2e-3", help="comma-separated relative steps to compare (see kvconvert distill --help)")
    ap.add_argument("--train", default="all", help="comma-separated parameter sets to compare: latent, attention, all")
    ap.add_argument("--hidden-weight", default="0", help="comma-separated hidden-state loss weights to compare")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--passkey-trials", type=int, default=5)
    ap.add_argument("--long-trials", type=int, default=8, help="trials per task of the long-context suite (0: none)")
    ap.add_argument("--long-length", type=int, default=4096)
    ap.add_argument("--chat-prompts", type=int, default=24,
                    help="chat agreement with the source on this many built-in prompts (0: none)")
    ap.add_argument("--val-only", action="store_true",
                    help="compare runs by their held-out validation only (no perplexity/passkey evaluation; faster)")
    ap.add_argument("--name", default=None, help="result file name (default distill_smollm2 or distill_smollm2_cpu)")
    args = ap.parse_args()
    if args.cpu:
        args.ratios, args.tokens, args.data = "0.05", "64k", "sampled"
        args.eval_every = min(args.eval_every, 8)
    if args.passkey_trials < 1:
        sys.exit("error: --passkey-trials must be at least 1")
    return args


def measure_ratio(ratio: float, args, work: Path, austen: list[Path], device: str, source_model, score, rows: list[dict],
                  save) -> None:
    """The zero-shot conversion at `ratio` (the 0-token row), then one distilled row per point of the grid (data mode
    × tokens × parameter set × hidden weight × lr), each distilled afresh from the zero-shot model. Appends to `rows`
    and calls `save()` after every row: a run stopped at a time limit keeps what it measured."""
    from kvconvert.convert.pipeline import ConvertOptions, convert
    from kvconvert.distill.run import distill_folder
    from kvconvert.distill.train import DistillOptions
    from kvconvert.loading import load_clla

    zs = work / f"r{ratio}-zero-shot"
    t = time.perf_counter()
    record = convert("smollm2", zs, ConvertOptions(kv_ratio=ratio))
    convert_s = time.perf_counter() - t
    base = {"kv_ratio_target": ratio, "kv_ratio": record["kv_ratio"], "plan": record["plan"]}
    model = load_clla(zs).model.to(device)
    row = base | {"data": "none", "tokens": 0, "train_s": 0.0, "convert_s": round(convert_s, 1)}
    rows.append(row | score(model, source_model))
    save()
    print(f"{ratio} zero-shot: ppl {rows[-1].get('perplexity')}", flush=True)
    grid = [(m, t, ts, float(hw), float(lr)) for m in args.data.split(",") for t in parse_tokens(args.tokens)
            for ts in args.train.split(",") for hw in args.hidden_weight.split(",") for lr in args.lr.split(",")]
    for mode, tokens, train_set, hidden_weight, lr in grid:
        out = work / f"r{ratio}-{mode}-{tokens}-{train_set}-{hidden_weight}-{lr}"
        opts = DistillOptions(
            tokens=tokens, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
            lr=lr, train=train_set, hidden_weight=hidden_weight, eval_every=args.eval_every,
            save_every=10**9, data=austen if mode == "austen" else [],
            sample_tokens=min(1_000_000, tokens),
        )
        t = time.perf_counter()
        with peak_memory(device) as memory:  # the distillation's own peak (sampling, training, validation)
            rec = distill_folder(zs, "smollm2", opts, out=out,
                                 log=lambda m: print("  " + m, flush=True))
        train_s = time.perf_counter() - t
        d = rec["distill"][-1]
        model = load_clla(out).model.to(device)
        row = base | {"data": mode, "tokens": d["tokens"], "train": train_set, "hidden_weight": hidden_weight, "lr": lr,
                      "train_s": round(train_s, 1), "tokens_per_s": d["tokens_per_s"],
                      "train_loop_s": d["seconds"], "best_step": d["best"]["step"], "steps": d["steps"],
                      "validation": d["validation"], "memory": memory}
        rows.append(row | score(model, source_model))
        save()
        best = d["best"]
        print(f"{ratio} {mode} {tokens:,} {train_set} hw={hidden_weight} lr={lr:g}: ppl {rows[-1].get('perplexity')}, "
              f"best validation KL {best['kl']:.4f} top-1 {best['top1']:.1%} ({train_s:.0f} s)", flush=True)
        shutil.rmtree(out, ignore_errors=True)


def print_validation(rows: list[dict]) -> None:
    """--val-only: each distilled run's best and zero-shot validation KL."""
    for r in (r for r in rows if r["tokens"] > 0):
        b = r["validation"][-1] if r["validation"] else {}
        print(f"{r['train']:>9} hw={r['hidden_weight']:g} lr={r['lr']:g}: best validation KL {min(v['val_kl'] for v in r['validation']):.4f}"
              f" (zero-shot {r['validation'][0]['val_kl']:.4f}), {r['tokens_per_s']:.0f} tok/s, last {b}")


def print_table(rows: list[dict], base_ppl: float) -> None:
    print(f"\n{'ratio':>6} {'data':>8} {'tokens':>10} {'train':>9} {'hw':>4} {'ppl':>9} {'x src':>6} {'top1':>6} {'KL':>6} {'pk1k':>5} {'pk4k':>5} {'train s':>8}")
    for r in rows:
        print(f"{r['kv_ratio_target']:>6} {r['data']:>8} {r['tokens']:>10,} {r.get('train', '-'):>9} "
              f"{r.get('hidden_weight', 0):>4g} {r['perplexity']:>9.3f} "
              f"{r['perplexity'] / base_ppl:>6.3f} {r['top1_agreement']:>6.1%} {r['kl']:>6.3f} "
              f"{r['passkey'][1024]:>5.0%} {r['passkey'][4096]:>5.0%} {r['train_s']:>8.0f}")
        if "chat" in r:
            print(f"{'':>8} chat top-1 along the source's answers {r['chat']['top1_agreement']:.1%}")
        for t in r.get("long_suite", []):
            share = f"{t['of_reference']:.0%} of the source" if t.get("of_reference") is not None else "-"
            print(f"{'':>8} {t['task']:>10} at {t['length']}: {t['accuracy']:.0%} (recall {t['recall']:.2f}; {share})")


def main() -> None:
    args = parse_args()
    name = args.name or ("distill_smollm2_cpu" if args.cpu else "distill_smollm2")
    text_path = data_file("austen_persuasion.txt", args.text)
    austen = [data_file(f, None) for f in AUSTEN_TRAIN] if "austen" in args.data else []

    import torch

    from kvconvert.cli.common import return_freed_memory
    from kvconvert.evaluate import read_text, text_windows
    from kvconvert.loading import load_any

    return_freed_memory()  # as `kvconvert distill` does, so that a run's peak RSS is the command's

    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = load_any("smollm2")
    source.model.to(device)
    windows = text_windows(source.tokenizer, read_text(text_path), 512, 20480)
    print("source ...", flush=True)
    scorer = Scorer(source.tokenizer, windows, args.passkey_trials, args.long_trials, args.long_length,
                    args.chat_prompts)
    score = (lambda model, ref: {}) if args.val_only else scorer

    src_row = score(source.model, None)
    scorer.reference_suite = src_row.get("long_suite")
    base_ppl = src_row.get("perplexity")
    rows = []
    settings = {k: v for k, v in vars(args).items()} | {"eval_text": str(text_path), "train_files": AUSTEN_TRAIN}
    save = lambda: write_result(name, {"source": src_row, "rows": rows, "settings": settings})  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="kvconvert-distill-"))
    try:
        for ratio in [float(r) for r in args.ratios.split(",")]:
            measure_ratio(ratio, args, work, austen, device, source.model, score, rows, save)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = save()
    if args.val_only:
        print_validation(rows)
        print(f"wrote {path}")
        return
    plot(rows, base_ppl, RESULTS / f"{name}.png")
    print_table(rows, base_ppl)
    print(f"source perplexity {base_ppl:.3f}; wrote {path}")


if __name__ == "__main__":
    main()
