"""A reference of the token-budget policies outside the runtime, at kv-head or layer-group granularity.

transformers runs a Llama-like source model under kvpress's protocol: one prefill of a window's prompt, compressed
once, then the scored tokens extend the compressed cache uncompressed. Per layer the prompt is scored by the
attention of its last `queries` queries, decayed by `decay` per token of age and summed over the query heads of each
kv head: a score (kv heads, prompt). The methods, all keeping `keep` slots of which `recent` are the most recent:
  h2o/group, h2o/head          the recent tokens + the highest-scoring older ones, chosen once for all kv heads
                               (scores summed: the runtime's granularity, one latent a layer group that every head
                               reads; reproduces the runtime's zsmerge:residual=0) or per kv head (ZSMerge's paper)
  zsmerge/group, zsmerge/head  the same with `merge_slots` merge slots: the evicted tokens, in position order, split
                               into one run per slot, each averaged (keys and values) into one slot attended with
                               + log(count), kept here as count copies of the slot, which is exact
`window_nll` scores one window under every method. Nothing in the runtime calls this module: its group rows are
checked against the runtime's ZSMerge (tests/test_policies.py), so its head rows measure what the granularity alone
is worth (`python -m bench.studies.head_granularity`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

METHODS = ("h2o/group", "h2o/head", "zsmerge/group", "zsmerge/head")
LLAMA_LIKE = ("llama", "mistral", "qwen2")  # prompt_scores fits them: q_proj after input_layernorm, rotary, no q norm


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

    from ...convert.source import cache_kwargs

    W = ids.shape[1]
    cache = DynamicCache()
    out = model(input_ids=ids[:, :ctx], **cache_kwargs(model, cache), output_hidden_states=True, logits_to_keep=1)
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
        rest = model(input_ids=ids[:, ctx:-1], **cache_kwargs(model, cache), position_ids=positions).logits
        logp = F.log_softmax(torch.cat([out.logits, rest], 1).float(), -1)
        result[method] = -logp.gather(-1, ids[:, ctx:, None]).mean().item()
    return result
