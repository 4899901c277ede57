"""Export a CLLA model as a DeepSeek-V3 checkpoint: transformers' DeepseekV3ForCausalLM loads it, and it is the
format whose multi-GPU MLA kernels vLLM and SGLang serve (tensor parallelism over the heads).

That format expresses a subset of CLLA plans: one latent per layer (no cross-layer groups), one rope key shared
by all heads, an RMSNorm on the latent (kv_a_layernorm), standard RoPE frequencies base^(-2i/rope_dim), no
biases on queries, keys or values, a dense MLP in every layer, a 16-bit cache. `deepseek_v3_reasons` names what a
plan breaks; `kvconvert convert --target deepseek-v3` makes plans that stay inside.

Mapping, per layer (H query heads, K kv heads, G = H / K):
  q_proj              = our q_proj, [q_nope | q_rope] per head, times our softmax scale / (Dn + Dr)^-0.5
                        (DeepSeek scales by its query head width)
  kv_a_proj_with_mqa  = [kv_down ; rope_proj]          (latent R rows, then the shared rope key's Dr rows)
  kv_a_layernorm      = our latent_norm
  kv_b_proj           = per query head h: [k_up rows of kv head h // G ; v_up rows of kv head h // G]
  o_proj, MLP, norms, embeddings: as they are.
RoPE: the rope rows are stored interleaved (pair i at dims 2i, 2i+1, rope_interleave True), as DeepSeek's own
checkpoints are: vLLM's kernels rotate adjacent pairs whatever the config says; transformers de-interleaves them
back to our rotate-half order. rope_theta comes from the kept frequencies. The LM head is always written (untied):
vLLM's DeepSeek model does not tie it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..config import CllaConfig
from ..errors import KvconvertError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


def geometric_base(inv: list[float], dim: int) -> float | None:
    """The base b when inv holds exactly a standard RoPE over dim dims, b^(-2i/dim) for i < dim/2; else None."""
    half = dim // 2
    if len(inv) != half or half < 2 or abs(inv[0] - 1.0) > 1e-9 or not 0 < inv[1] < 1:
        return None
    theta = inv[1] ** (-half)  # inv[1] = b^(-2/dim)
    return theta if all(math.isclose(f, theta ** (-2 * i / dim), rel_tol=1e-5) for i, f in enumerate(inv)) else None


def rope_theta(cfg: CllaConfig) -> float | None:
    """The base b with kept frequencies b^(-2i/rope_dim), i = 0..rope_dim/2-1, the same in every layer; else None."""
    if not cfg.rope_dim or cfg.rope_heads != 1:
        return None
    indices = {tuple(heads[0]) for heads in cfg.rope_freq_index}
    if len(indices) != 1:
        return None
    return geometric_base([cfg.rope_inv_freq[i] for i in indices.pop()], cfg.rope_dim)


def feature_reasons(cfg: CllaConfig) -> list[str]:
    """What a model's source brings that DeepSeek-V3 cannot express, whatever the plan (a plan's config or a
    source's identity config alike)."""
    reasons = []
    if cfg.qkv_bias or cfg.mlp_bias or cfg.o_bias:
        reasons.append("it has biases (DeepSeek-V3 has none on queries, keys, values or the MLP)")
    if any(w is not None for w in cfg.layer_windows):
        reasons.append("it has sliding-window layers")
    if cfg.qk_norm or cfg.sandwich_norms or cfg.embed_scale != 1.0:
        reasons.append("its source's norms or embedding scale have no DeepSeek-V3 counterpart")
    if cfg.rope_attention_scaling != 1.0:
        reasons.append("its RoPE scales attention (YaRN-style scaling is not mapped)")
    return reasons


def deepseek_v3_reasons(cfg: CllaConfig) -> list[str]:
    """Why this plan is not a DeepSeek-V3 model (empty: it is one)."""
    reasons = []
    if any(len(g) != 1 for g in cfg.layer_groups):
        reasons.append("layers share a latent (DeepSeek-V3 has one latent per layer)")
    if not cfg.rope_dim or cfg.rope_heads != 1:
        reasons.append("it needs one rope key shared by all heads")
    elif rope_theta(cfg) is None:
        reasons.append("its rope frequencies are not a standard RoPE of the rope dims")
    if not cfg.latent_norm:
        reasons.append("it needs an RMSNorm on the latent (kv_a_layernorm)")
    if cfg.rope_from_latent:
        reasons.append("its rope keys come from the latent (DeepSeek-V3 caches its rope key)")
    if cfg.kv_bits != 16 or cfg.rope_bits != 16 or cfg.kv_tail_dim:
        reasons.append("its cache is quantized (DeepSeek-V3 caches 16-bit values)")
    if cfg.uneven_latent:
        reasons.append("its layer groups cache latents of different widths (DeepSeek-V3 has one kv_lora_rank)")
    return reasons + feature_reasons(cfg)


def source_reasons(base: CllaConfig) -> list[str]:
    """Why a source (its identity config) cannot become a DeepSeek-V3 model whatever the plan."""
    reasons = feature_reasons(base)
    if geometric_base(base.rope_inv_freq, base.head_dim) is None:
        reasons.append("its RoPE frequencies are scaled (not base^(-2i/d))")
    return reasons


def deepseek_v3_config(cfg: CllaConfig):
    from transformers import DeepseekV3Config

    extra = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k, None) is not None}
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,  # MLA: every query head has its own k/v from the latent
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False,
        q_lora_rank=None,
        kv_lora_rank=cfg.kv_latent_dim,
        qk_rope_head_dim=cfg.rope_dim,
        qk_nope_head_dim=cfg.qk_nope_dim,
        v_head_dim=cfg.head_dim,
        first_k_dense_replace=cfg.num_hidden_layers,  # a dense MLP in every layer: no MoE
        rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta(cfg)},
        attention_bias=False,
        **extra,
    )


def deepseek_v3_state_dict(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    Dn, Dr, Dv = cfg.qk_nope_dim, cfg.rope_dim, cfg.head_dim
    G = H // K
    q_scale = cfg.softmax_scale / (Dn + Dr) ** -0.5
    half = Dr // 2
    interleave = [j for i in range(half) for j in (i, i + half)]  # rotate-half pair (i, i + Dr/2) -> dims 2i, 2i+1
    q_order = torch.cat([h * (Dn + Dr) + torch.cat([torch.arange(Dn), Dn + torch.tensor(interleave)]) for h in range(H)])
    m = model.model
    sd = {"model.embed_tokens.weight": m.embed_tokens.weight, "model.norm.weight": m.norm.weight,
          # written (a copy: shared storage would be saved once) even when tied: vLLM's DeepSeek does not tie
          "lm_head.weight": model.lm_head.weight.detach().clone()}
    for i, layer in enumerate(m.layers):
        a, proj = layer.self_attn, m.latent_proj[i]
        p = f"model.layers.{i}."
        k_up = a.k_up.weight.view(K, Dn, -1) if Dn else None
        v_up = a.v_up.weight.view(K, Dv, -1)
        kv_b = [torch.cat([k_up[h // G], v_up[h // G]]) if Dn else v_up[h // G] for h in range(H)]
        sd |= {
            p + "input_layernorm.weight": layer.input_layernorm.weight,
            p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            p + "self_attn.q_proj.weight": a.q_proj.weight[q_order] * q_scale,
            p + "self_attn.kv_a_proj_with_mqa.weight": torch.cat([proj.kv_down.weight, proj.rope_proj.weight[interleave]]),
            p + "self_attn.kv_a_layernorm.weight": proj.latent_norm.weight,
            p + "self_attn.kv_b_proj.weight": torch.cat(kv_b),
            p + "self_attn.o_proj.weight": a.o_proj.weight,
        } | {p + f"mlp.{n}.weight": getattr(layer.mlp, n).weight for n in ("gate_proj", "up_proj", "down_proj")}
    return {k: v.detach().contiguous() for k, v in sd.items()}


def export_deepseek_v3(src: str | Path, dest: str | Path, force: bool = False) -> dict:
    """Write DEST: a DeepseekV3ForCausalLM checkpoint of the CLLA folder SRC (atomically; refused with the
    reasons when the plan does not fit the format). Returns a summary."""
    from transformers import DeepseekV3ForCausalLM

    from ..loading import load_clla
    from .export import atomic_folder, check_output

    dest = Path(dest)
    if dest.resolve() == Path(src).resolve():
        raise KvconvertError(f"{dest}: the export would replace the model it reads; choose another DEST")
    check_output(dest, force)
    loaded = load_clla(src)
    cfg = loaded.model.config
    reasons = deepseek_v3_reasons(cfg)
    if reasons:
        raise KvconvertError(f"{src}: cannot be expressed as DeepSeek-V3: {'; '.join(reasons)} "
                             "(`kvconvert convert SRC OUT --target deepseek-v3` makes such plans where the source allows)")
    dtype = next(loaded.model.parameters()).dtype
    ds_config = deepseek_v3_config(cfg)
    with torch.device("meta"):
        ds = DeepseekV3ForCausalLM(ds_config)
    missing, unexpected = ds.load_state_dict(deepseek_v3_state_dict(loaded.model), strict=False, assign=True)
    if missing or unexpected:
        raise KvconvertError(f"DeepSeek-V3 export: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    ds = ds.to(dtype)
    with atomic_folder(dest, force) as tmp:
        ds.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file() and not (tmp / name).exists():
                shutil.copy2(Path(src) / name, tmp / name)
        (tmp / "kvconvert_export.json").write_text(json.dumps({
            "format": "deepseek-v3", "source": str(src), "kv_latent_dim": cfg.kv_latent_dim,
            "qk_rope_head_dim": cfg.rope_dim, "qk_nope_head_dim": cfg.qk_nope_dim, "v_head_dim": cfg.head_dim,
            "rope_theta": ds_config.rope_parameters["rope_theta"],
        }, indent=2) + "\n")
    return {"dest": str(dest), "format": "deepseek-v3", "layers": cfg.num_hidden_layers,
            "kv_lora_rank": cfg.kv_latent_dim, "qk_rope_head_dim": cfg.rope_dim}
