"""Head-level or group-level token selection: what ZSMerge's per-kv-head budget is worth on a source model.

    python -m bench.studies.head_granularity                      # SmolLM2, 12 windows of Persuasion, 5% kept
    python -m bench.compare_policies bench/results/head_granularity_smollm2_cpu.json --against "zsmerge/group"

The ZSMerge authors budget each kv head: every head keeps its own heavy hitters and merges its own evicted tokens.
kvconvert's policies budget a layer group, whose one latent every head reads, so all of a group's heads keep the
same tokens. For a source model (one layer a group, one key and value head per kv head) the two can differ, and this
measures by how much, outside the runtime: transformers runs the source under kvpress's protocol (compress the
prompt once, score the --score-last tokens that extend it; the windows of `python -m bench.zsmerge --prompt-only`).

One prefill a window, then per layer the attention of the prompt's last --queries queries, decayed by --decay per
token of age and summed over the query heads of each kv head: a score (kv heads, prompt). The rows, all at one
budget (kept = ceil(budget × window), its split into recent and merge slots the runtime's ZSMerge's):
  h2o/group, h2o/head          the recent window + the highest-scoring older tokens; the score summed over the kv
                               heads (group: kvconvert's granularity; this row reproduces the runtime's
                               zsmerge:residual=0) or one selection per kv head (head)
  zsmerge/group, zsmerge/head  the same with the merge slots: the evicted tokens, in position order, split into one
                               run per merge slot, each averaged (keys and values) into one slot that is attended
                               with + log(count) — kept here as count copies of the slot, which is exact
Writes bench/results/<--name>.json with each row's per-window NLL (for bench/compare_policies.py).
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import argument_parser, data_file, write_result


METHODS = ("h2o/group", "h2o/head", "zsmerge/group", "zsmerge/head")
LLAMA_LIKE = ("llama", "mistral", "qwen2")  # q_proj after input_layernorm, rotary queries, no q norm


@torch.no_grad()
def prompt_scores(model, hidden: torch.Tensor, layer, keys: torch.Tensor, queries: int, decay: float) -> torch.Tensor:
    """Decayed attention of the last `queries` prompt queries of `layer` (input `hidden` (1, C, E), rotated `keys`
    (1, K, C, D)), summed over the query heads of each kv head: (K, C)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    H, K, C, D = cfg.num_attention_heads, keys.shape[1], keys.shape[2], keys.shape[3]
    Q = min(queries, C)
    x = layer.input_layernorm(hidden[:, -Q:])
    q = layer.self_attn.q_proj(x).view(1, Q, H, D).transpose(1, 2)
    pos = torch.arange(C - Q, C, device=hidden.device)
    cos, sin = model.model.rotary_emb(x, pos[None])
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    logits = q @ keys.repeat_interleave(H // K, 1).transpose(-1, -2) / math.sqrt(D)
    future = torch.arange(C, device=hidden.device)[None, :] > pos[:, None]
    attention = logits.float().masked_fill(future, float("-inf")).softmax(-1)[0]  # (H, Q, C)
    age = (C - 1 - pos).float()
    return torch.einsum("hqc,q->hc", attention, decay**age).view(K, H // K, C).sum(1)


def select(scores: torch.Tensor, recent: int, heavy: int, per_head: bool) -> torch.Tensor:
    """Kept prompt positions per kv head (K, heavy + recent), ascending: the last `recent` and the `heavy`
    highest-scoring older ones, chosen per kv head or once for all of them (scores summed)."""
    K, C = scores.shape
    if not per_head:
        scores = scores.sum(0, keepdim=True).expand(K, C)
    top = scores[:, : C - recent].topk(heavy, -1).indices.sort(-1).values
    return torch.cat([top, torch.arange(C - recent, C, device=scores.device).expand(K, recent)], -1)


def compress(keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, merge_slots: int):
    """The compressed (keys, values) (1, K, S, D) of one layer: the kept positions, then per merge slot its run of
    evicted tokens' mean key and value, repeated count times (the same as attending it with + log(count))."""
    K, D = keys.shape[1], keys.shape[3]
    index = kept[None, :, :, None].expand(1, K, kept.shape[1], D)
    out_k, out_v = [keys.gather(2, index)], [values.gather(2, index)]
    if merge_slots:
        evicted = torch.ones(K, keys.shape[2], dtype=torch.bool, device=keys.device).scatter_(1, kept, False)
        positions = evicted.nonzero()[:, 1].view(K, -1)  # (K, E) ascending: every head evicts as many tokens
        for run in torch.tensor_split(positions, merge_slots, dim=1):
            if run.shape[1] == 0:
                continue
            index = run[None, :, :, None].expand(1, K, run.shape[1], D)
            for out, src in ((out_k, keys), (out_v, values)):
                mean = src.gather(2, index).mean(2, keepdim=True)
                out.append(mean.expand(1, K, run.shape[1], D))
    return torch.cat(out_k, 2).contiguous(), torch.cat(out_v, 2).contiguous()


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, ctx: int, methods: list[str], keep: int, recent: int, merge_slots: int,
               decay: float, queries: int) -> dict[str, float]:
    """Mean NLL of ids[:, ctx:] (ids (1, W)) after the prompt ids[:, :ctx], for the full cache and each method (the
    prompt compressed once to `keep` slots, `recent` of them recent, `merge_slots` of them merged for zsmerge/*)."""
    from transformers import DynamicCache

    W = ids.shape[1]
    cache = DynamicCache()
    out = model(input_ids=ids[:, :ctx], past_key_values=cache, output_hidden_states=True, logits_to_keep=1)
    full = [(layer.keys, layer.values) for layer in cache.layers]
    scores = [prompt_scores(model, out.hidden_states[i], model.model.layers[i], k, queries, decay)
              for i, (k, _) in enumerate(full)]
    result = {}
    for method in ["full", *methods]:
        kind, _, granularity = method.partition("/")
        slots = merge_slots if kind == "zsmerge" else 0
        for i, layer in enumerate(cache.layers):  # every method starts again from the prompt's full cache
            if method == "full":
                layer.keys, layer.values = full[i]
            else:
                kept = select(scores[i], recent, keep - recent - slots, granularity == "head")
                layer.keys, layer.values = compress(*full[i], kept, slots)
        positions = torch.arange(ctx, W - 1, device=ids.device)[None]
        rest = model(input_ids=ids[:, ctx:-1], past_key_values=cache, position_ids=positions).logits
        logp = F.log_softmax(torch.cat([out.logits, rest], 1).float(), -1)
        result[method] = -logp.gather(-1, ids[:, ctx:, None]).mean().item()
    return result


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
    policy = make_policy("zsmerge", args.budget, queries=args.queries)  # the runtime's sizes and defaults
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
        "tool": "reference", "harness": "transformers, kvpress's protocol (bench/studies/head_granularity.py)", "window": W,
        "score_last": args.score_last, "windows": windows.shape[0], "kept": keep, "recent": recent,
        "merge_slots": merge_slots, "decay": decay,
        "queries": queries, "seconds": round(time.perf_counter() - t0, 1), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
