"""Calibration tokens weighted by the attention they receive in the latent fit (Compressor.fit_cov), against the
first token's keys and values stored exactly.

    python -m bench.studies.attention_weight [--ratio 0.10] [--betas 0,0.5,1] [--text FILE] [--name NAME]

SmolLM2-135M-Instruct, `kvconvert convert`'s calibration; the planner's plan at --ratio (chosen as `convert` chooses
it), rebuilt with each token weight β of the fit ((1 - β) + β × the attention a token receives; 0: every token alike,
the fit before weights). Each model is judged by the planner's held-out and recall KL, chat top-1 along the source's
greedy answers to 24 built-in prompts (teacher-forced, as `kvconvert eval --chat` counts it), and KL / top-1 against the source on 8 windows of 512
tokens of --text (default: Northanger Abbey, which calibration never reads). For β = 0 and the default β also with
the first token's keys and values, its value alone, or its key alone, as the source's projections of the converted
model's own hidden states (what a cache that kept that one token exact would hold; rope keys from the latent, whose
layout is the source's key layout). Writes bench/results/NAME.json after every row.
"""

from __future__ import annotations

import time

from bench.common import argument_parser, data_file, planned, write_result


def exact_first_token(model, source, what: str):
    """Hooks that replace the first position's rebuilt keys (`k`), values (`v`) or both (`kv`) by the source's
    projections of the same layer input; returns the handles. Valid on forwards that start at position 0."""
    handles, inputs = [], {}
    for layer, (ours, theirs) in enumerate(zip(model.model.layers, source.model.model.layers)):
        a, s = ours.self_attn, theirs.self_attn
        handles.append(a.register_forward_pre_hook(lambda m, args, layer=layer: inputs.__setitem__(layer, args[0])))
        pairs = [(a.rope_up, s.k_proj)] * ("k" in what) + [(a.v_up, s.v_proj)] * ("v" in what)
        for up, proj in pairs:
            def hook(m, args, out, layer=layer, proj=proj):
                out = out.clone()
                out[:, 0] = proj(inputs[layer][:, 0])
                return out
            handles.append(up.register_forward_hook(hook))
    return handles


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--ratio", type=float, default=0.10)
    ap.add_argument("--betas", default="0,0.5,1")
    ap.add_argument("--text", default=None)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    name = args.name or f"attention_weight_smollm2_{args.ratio:g}"
    text_path = data_file("austen_northangerabbey.txt", args.text)

    import torch
    import torch.nn.functional as F

    import kvconvert.convert.plan as planning
    from kvconvert.chat_fidelity import chat_ids, chat_prompts, greedy_answer
    from kvconvert.convert.build import ATTENTION_WEIGHT, Compressor
    from kvconvert.convert.source import load_source, resolve

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    source = load_source(resolve("smollm2"))
    tok = source.tokenizer
    run = planned(source, args.ratio)
    heldout, cal, probe, plan = run.heldout, run.cal, run.probe, run.report.plan
    print(f"{plan.describe()} ({time.perf_counter() - t0:.0f} s)", flush=True)
    source_logp = F.log_softmax(source.model(heldout, use_cache=False).logits.float(), -1)
    probe_logp = probe.logp(source.model)
    ids = tok(text_path.read_text()[20_000:200_000], return_tensors="pt").input_ids[0]
    windows = ids[: 8 * 512].view(8, 512)
    text_logp = F.log_softmax(source.model(windows, use_cache=False).logits.float(), -1)

    answers = []  # the source's greedy answers, as chat_fidelity.chat_agreement takes them
    for message in chat_prompts(24):
        ids = chat_ids(tok, message)
        answers.append((ids, greedy_answer(source.model, ids, 48, tok.eos_token_id, tok.eos_token_id)))

    def judge(model) -> dict:
        logp = F.log_softmax(model(windows, use_cache=False).logits.float(), -1)
        agree = total = 0
        for ids, answer in answers:
            logits = model(torch.tensor([ids + answer]), use_cache=False).logits[0, len(ids) - 1 : -1]
            agree += (logits.argmax(-1) == torch.tensor(answer)).sum().item()
            total += len(answer)
        return {"heldout_kl": planning.kl_to_source(model, heldout, source_logp), "recall_kl": probe.kl(model, probe_logp),
                "text_kl": (text_logp.exp() * (text_logp - logp)).sum(-1).mean().item(),
                "text_top1": (logp.argmax(-1) == text_logp.argmax(-1)).float().mean().item(),
                "chat_top1": agree / total, "chat_answer_tokens": total}

    result = {"ratio": args.ratio, "plan": plan.describe(), "text": text_path.name, "rows": []}
    for beta in [float(b) for b in args.betas.split(",")]:
        model = Compressor(source.model, source.model_type, "smollm2", cal, beta).build(plan)
        variants = [("", None)]
        if beta in (0.0, ATTENTION_WEIGHT):
            variants += [("first token's keys and values exact", "kv"), ("first token's value exact", "v"),
                         ("first token's key exact", "k")]
        for label, what in variants:
            handles = exact_first_token(model, source, what) if what else []
            try:
                row = {"attention_weight": beta, "variant": label or "as built", **judge(model)}
            finally:
                for h in handles:
                    h.remove()
            result["rows"].append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            write_result(name, result)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
