"""What the share of conversations in calibration does to chat agreement, short text and the planner's judges.

    python -m bench.studies.chat_share [--ratios 0.25 0.10] [--shares 0.25 0.5] [--prompts 24] [--text FILE]

SmolLM2-135M-Instruct, zero-shot, `kvconvert convert`'s defaults except the share of calibration and held-out rows
sampled as conversations in the source's chat template (calibrate.CHAT_SHARE; the default is the first share
given). For each ratio and share: the planner's plan, held-out KL and recall KL (each on its own calibration, so
only roughly comparable across shares); chat agreement with the source (kvconvert.chat_fidelity: teacher-forced
top-1 along the source's greedy answers and first-sentence match, on --prompts built-in prompts, seed 0); and
perplexity on --text (default Persuasion) in 512-token windows (the first 20,480 tokens) as a ratio to the source's.
Writes bench/results/chat_share_smollm2.json after every row.
"""

from __future__ import annotations

import time

from bench.common import argument_parser, data_file, write_result


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.10])
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--text", default=None, help="default: ../shared/data/austen_persuasion.txt")
    ap.add_argument("--name", default="chat_share_smollm2")
    args = ap.parse_args()

    import kvconvert.convert.pipeline as pipeline
    from kvconvert.chat_fidelity import chat_agreement
    from kvconvert.evaluate import read_text, score_windows, text_windows
    from kvconvert.convert.source import load_source, resolve

    t0 = time.perf_counter()
    source = load_source(resolve("smollm2"))
    text = read_text(data_file("austen_persuasion.txt", args.text))
    windows = text_windows(source.tokenizer, text, 512, 20480)
    ref_ppl = score_windows(source.model, windows)["perplexity"]
    result = {"prompts": args.prompts, "text": str(args.text or "austen_persuasion.txt"),
              "source": {"perplexity_512": ref_ppl}, "rows": []}
    for ratio in args.ratios:
        for share in args.shares:
            pipeline.CHAT_SHARE = share
            t = time.perf_counter()
            opts = pipeline.ConvertOptions(kv_ratio=ratio)
            model, summary = pipeline.compress(source, "smollm2", opts, {})
            seconds = time.perf_counter() - t
            chat = chat_agreement(model, source.model, source.tokenizer, args.prompts)
            ppl = score_windows(model, windows)["perplexity"]
            result["rows"].append({
                "ratio": ratio, "chat_share": share, "plan": summary["plan"], "heldout_kl": summary["heldout_kl"],
                "recall_kl": summary["recall_kl"], "convert_s": round(seconds, 1),
                "chat_top1": chat["top1_agreement"], "chat_first_sentence": chat["first_sentence_match"],
                "chat_answer_tokens": chat["answer_tokens"], "perplexity_512": ppl, "perplexity_ratio": ppl / ref_ppl,
                "examples": chat["examples"][:4],
            })
            print(f"ratio {ratio:g} share {share:g}: chat top-1 {chat['top1_agreement']:.3f}, first sentence "
                  f"{chat['first_sentence_match']:.2f}, ppl {ppl / ref_ppl:.3f}x, {summary['plan']}", flush=True)
            write_result(args.name, result | {"seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
