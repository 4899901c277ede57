"""`kvconvert profile memory`, analytic part: KV bytes per token, totals, and what fits a memory budget.

The budget covers weights + KV cache. The source's figures come from the same config (its standard 16-bit
cache, its parameter count), so the two columns compare like for like.
"""

from __future__ import annotations

from ..config import CllaConfig, kv_bytes_breakdown

GIB = 1 << 30


def source_param_count(cfg: CllaConfig) -> int:
    """Parameters of the unconverted source model, from the dims the CLLA config keeps."""
    h, H, K, D, I, V = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    attn = h * H * D + 2 * h * K * D + H * D * h
    if cfg.qkv_bias:
        attn += H * D + 2 * K * D
    if cfg.o_bias:
        attn += h
    mlp = 3 * h * I + ((2 * I + h) if cfg.mlp_bias else 0)
    per_layer = attn + mlp + 2 * h
    return V * h + cfg.num_hidden_layers * per_layer + h + (0 if cfg.tie_word_embeddings else V * h)


def clla_param_count(cfg: CllaConfig) -> int:
    import torch

    from ..model import CllaForCausalLM

    with torch.device("meta"):
        model = CllaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def _fits(budget_bytes: int, weights: int, per_token: int, context: int, batch: int) -> dict:
    free = budget_bytes - weights
    return {
        "max_context_at_batch": max(0, free // (per_token * batch)) if free > 0 else 0,
        "max_batch_at_context": max(0, free // (per_token * context)) if free > 0 else 0,
    }


def memory_profile(cfg: CllaConfig, context: int, batch: int, budget_gib: float, weight_bytes_per_param: int) -> dict:
    """Analytic memory figures of the converted model and of its source."""
    breakdown = kv_bytes_breakdown(cfg)
    per_token = sum(breakdown.values())
    src_per_token = cfg.source_kv_bytes_per_token or per_token
    budget = int(budget_gib * GIB)
    weights = clla_param_count(cfg) * weight_bytes_per_param
    src_weights = source_param_count(cfg) * weight_bytes_per_param
    return {
        "context": context,
        "batch": batch,
        "budget_gib": budget_gib,
        "weight_bytes_per_param": weight_bytes_per_param,
        "kv_bytes_per_token": breakdown | {"total": per_token},
        "source_kv_bytes_per_token": src_per_token,
        "kv_ratio": per_token / src_per_token,
        "converted": {
            "kv_bytes_total": per_token * context * batch,
            "weights_bytes": weights,
            **_fits(budget, weights, per_token, context, batch),
        },
        "source": {
            "kv_bytes_total": src_per_token * context * batch,
            "weights_bytes": src_weights,
            **_fits(budget, src_weights, src_per_token, context, batch),
        },
    }
