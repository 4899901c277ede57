"""Where converted models leave their source's chat answers: top-1 agreement by the source's own top-2 margin.

    python -m bench.studies.chat_margins OUT [OUT ...] [--prompts 24] [--name NAME]

SmolLM2-135M-Instruct as the reference; each OUT a converted folder. For each model, `kvconvert eval --chat`'s
agreement (kvconvert.chat_fidelity.chat_agreement: teacher-forced top-1 along the source's greedy answers to
--prompts built-in prompts, seed 0), split by the source's margin between its first and second token at each answer
position. The same for the source in bfloat16 (weights rounded, logits in float32): how far a model that differs
from the source only by rounding already falls below 100%. Writes bench/results/NAME.json after every model.
"""

from __future__ import annotations

from bench.common import argument_parser, write_result


class Float32Logits:
    """A model whose logits are cast to float32 (chat_agreement compares argmaxes; a bf16 model's ties stay ties)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids, **kw):
        out = self.model(ids, **kw)
        out.logits = out.logits.float()
        return out

    def generate(self, *args, **kw):
        return self.model.generate(*args, **kw)

    def parameters(self):
        return self.model.parameters()


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("models", nargs="+", help="converted model folders")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--name", default="chat_margins_smollm2")
    args = ap.parse_args()

    import json
    from pathlib import Path

    import torch

    from kvconvert.chat_fidelity import chat_agreement
    from kvconvert.convert.source import load_source, resolve
    from kvconvert.loading import load_clla

    torch.set_grad_enabled(False)
    source = load_source(resolve("smollm2"))
    rows = []
    candidates = [("source in bfloat16", lambda: Float32Logits(load_source(resolve("smollm2"), torch.bfloat16).model),
                   None)]
    for folder in args.models:
        record = json.loads((Path(folder) / "conversion.json").read_text())
        candidates.append((f"CLLA {record['target_kv_ratio']:g}", lambda f=folder: load_clla(f).model, record))
    for name, load, record in candidates:
        r = chat_agreement(load(), source.model, source.tokenizer, n_prompts=args.prompts)
        row = {"model": name, **{k: r[k] for k in ("answer_tokens", "top1_agreement", "first_sentence_match",
                                                     "by_reference_margin")}}
        if record is not None:
            row |= {"plan": record["plan"], "kv_ratio": record["kv_ratio"]}
        rows.append(row)
        bins = ", ".join(f"{b['margin_from']:g}+: {b['top1_agreement']:.1%} of {b['tokens']}"
                         for b in r["by_reference_margin"])
        print(f"{name}: top-1 {r['top1_agreement']:.1%} ({bins})", flush=True)
        write_result(args.name, {"prompts": args.prompts, "rows": rows})


if __name__ == "__main__":
    main()
