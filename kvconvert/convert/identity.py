"""The identity conversion: the CLLA model that is exactly its source.

One layer per group; the latent holds the values (W_dkv = Wv, W_uv = I); every key dim is a rope dim
(W_kr = Wk, one rope head per kv head, all frequencies). Its logits equal the source's to float tolerance,
which is what proves the model code right; compressed plans start from the same source description.
"""

from __future__ import annotations

import importlib

import torch

from ..config import CllaConfig, source_kv_bytes_per_token
from ..errors import KvconvertError
from ..model import CllaForCausalLM
from .source import QK_NORM_ARCHITECTURES


# Gemma 3 text: RoPE base per layer type; the frequency table holds both, global first (see source_rope)
GEMMA = ("gemma3_text",)


def _rotary_module(model_type: str):
    name = "gemma3" if model_type in GEMMA else model_type
    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    return next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))


def source_rope(hf_config, model_type: str) -> tuple[list[float], float]:
    """inv_freq and the attention scaling of the source's rotary embedding: head_dim/2 frequencies, or for a source
    whose layer types use different bases (Gemma 3), the full-attention table then the sliding one (head_dim
    entries; each layer group picks its half through rope_freq_index)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    types = [params[t] for t in ("full_attention", "sliding_attention") if isinstance(params.get(t), dict)]
    if any(p.get("rope_type") == "dynamic" for p in (types or [params])):
        raise KvconvertError("dynamic-NTK RoPE scaling is not supported (its frequencies change with length)")
    rotary = _rotary_module(model_type)(config=hf_config)
    if model_type not in GEMMA:
        return rotary.inv_freq.float().tolist(), float(rotary.attention_scaling)
    tables = [getattr(rotary, f"{t}_inv_freq") for t in ("full_attention", "sliding_attention")]
    scalings = {float(getattr(rotary, f"{t}_attention_scaling")) for t in ("full_attention", "sliding_attention")}
    if len(scalings) > 1:
        raise KvconvertError(f"RoPE attention scaling differs between layer types ({sorted(scalings)}): not supported")
    return torch.cat(tables).float().tolist(), scalings.pop()


def source_rope_offsets(hf_config, model_type: str) -> list[int]:
    """Per layer, where its frequencies start in the table of source_rope (0, or head_dim/2 for Gemma's sliding
    layers)."""
    L = hf_config.num_hidden_layers
    if model_type not in GEMMA:
        return [0] * L
    D = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return [D // 2 if t == "sliding_attention" else 0 for t in hf_config.layer_types]


def check_supported_features(hf_config, model_type: str) -> None:
    """Refuse source options the CLLA model does not express (one line each)."""
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(hf_config, name, None) is not None:
            raise KvconvertError(f"{model_type}: {name} is not supported")
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise KvconvertError(f"{model_type}: bidirectional attention is not supported (decoder-only, causal)")


def source_layer_windows(hf_config, model_type: str) -> list[int | None]:
    L = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if model_type == "mistral" and window:
        return [window] * L
    return [None] * L


def source_biases(hf_config, model_type: str) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o bias, mlp bias) of a supported architecture."""
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    if model_type == "qwen2":
        return True, False, mlp_bias
    if model_type in ("llama", "qwen3", *GEMMA):
        b = bool(getattr(hf_config, "attention_bias", False))
        return b, b, mlp_bias
    return False, False, mlp_bias


def identity_config(hf_config, model_type: str, source_name: str) -> CllaConfig:
    """CllaConfig of the identity plan for a source config (no weights needed)."""
    H = hf_config.num_attention_heads
    K = getattr(hf_config, "num_key_value_heads", None) or H
    D = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // H
    L = hf_config.num_hidden_layers
    check_supported_features(hf_config, model_type)
    inv_freq, scaling = source_rope(hf_config, model_type)
    offsets = source_rope_offsets(hf_config, model_type)
    qkv_bias, o_bias, mlp_bias = source_biases(hf_config, model_type)
    gemma = model_type in GEMMA
    gen = {k: getattr(hf_config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return CllaConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=K,
        head_dim=D,
        hidden_act=getattr(hf_config, "hidden_act", None) or hf_config.hidden_activation,
        rms_norm_eps=hf_config.rms_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        rope_inv_freq=inv_freq,
        rope_attention_scaling=scaling,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        softmax_scale=(hf_config.query_pre_attn_scalar if gemma else D) ** -0.5,
        layer_windows=source_layer_windows(hf_config, model_type),
        layer_groups=[[i] for i in range(L)],
        kv_latent_dim=K * D,
        qk_nope_dim=0,
        rope_dim=D,
        rope_heads=K,
        rope_freq_index=[[list(range(offsets[i], offsets[i] + D // 2)) for _ in range(K)] for i in range(L)],
        kv_bits=16,
        qk_norm=model_type in QK_NORM_ARCHITECTURES,
        embed_scale=hf_config.hidden_size**0.5 if gemma else 1.0,
        sandwich_norms=gemma,
        source_name=source_name,
        source_model_type=model_type,
        source_kv_bytes_per_token=source_kv_bytes_per_token(L, K, D),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        **{k: v for k, v in gen.items() if v is not None},
    )


def norm_gain(norm, config: CllaConfig) -> torch.Tensor:
    """An RMSNorm's per-dim gain: Gemma's norms multiply by 1 + w, the others by w."""
    return (norm.weight + 1 if config.sandwich_norms else norm.weight).detach()


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def identity_state_dict(source_model, config: CllaConfig) -> dict[str, torch.Tensor]:
    """Map the source's weights onto the identity plan's parameter names."""
    src = source_model.model
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": src.embed_tokens.weight.detach(),
        "model.norm.weight": norm_gain(src.norm, config),
        "lm_head.weight": source_model.lm_head.weight.detach(),
    }
    KD = config.num_key_value_heads * config.head_dim
    for i, layer in enumerate(src.layers):
        a = layer.self_attn
        if (a.q_proj.bias is not None) != config.qkv_bias or (a.o_proj.bias is not None) != config.o_bias:
            raise KvconvertError(f"layer {i}: attention biases differ from what the {config.source_model_type} config says")
        p = f"model.layers.{i}."
        norm = lambda m: norm_gain(m, config)  # noqa: E731
        tensors = {
            "input_layernorm.weight": norm(layer.input_layernorm),
            # ours is the pre-MLP norm; Gemma calls that one pre_feedforward_layernorm and norms outputs besides
            "post_attention_layernorm.weight": norm(layer.pre_feedforward_layernorm if config.sandwich_norms
                                                    else layer.post_attention_layernorm),
            "self_attn.q_proj.weight": a.q_proj.weight,
            "self_attn.q_proj.bias": _bias(a.q_proj),
            "self_attn.o_proj.weight": a.o_proj.weight,
            "self_attn.o_proj.bias": _bias(a.o_proj),
            "self_attn.v_up.weight": torch.eye(KD, dtype=a.v_proj.weight.dtype),
            "self_attn.v_up.bias": _bias(a.v_proj),
        }
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, name)
            tensors[f"mlp.{name}.weight"] = lin.weight
            tensors[f"mlp.{name}.bias"] = _bias(lin)
        if config.sandwich_norms:
            tensors["attn_out_norm.weight"] = norm(layer.post_attention_layernorm)
            tensors["mlp_out_norm.weight"] = norm(layer.post_feedforward_layernorm)
        sd.update({p + k: v.detach() for k, v in tensors.items() if v is not None})
        g = f"model.latent_proj.{i}."
        sd[g + "kv_down.weight"] = a.v_proj.weight.detach()
        # qk_norm: the key norm's gain folded into the rope key weights (a per-dim scale of the raw key); its 1/RMS
        # is the layer's cached key scale, from the raw key projection
        gain = (norm(a.k_norm).repeat(config.num_key_value_heads) if config.qk_norm
                else torch.ones(KD, dtype=a.k_proj.weight.dtype))
        sd[g + "rope_proj.weight"] = (a.k_proj.weight * gain[:, None]).detach()
        if a.k_proj.bias is not None:
            sd[g + "rope_proj.bias"] = (a.k_proj.bias * gain).detach()
        if config.qk_norm:
            sd[p + "self_attn.q_norm.weight"] = norm(a.q_norm)
            sd[p + "self_attn.q_map"] = torch.eye(config.head_dim, dtype=a.q_proj.weight.dtype).expand(
                config.num_attention_heads, -1, -1).clone()
            sd[p + "self_attn.k_scale.proj.weight"] = a.k_proj.weight.detach()
            if a.k_proj.bias is not None:
                sd[p + "self_attn.k_scale.proj.bias"] = a.k_proj.bias.detach()
            sd[p + "self_attn.k_scale.gain"] = torch.ones(config.num_key_value_heads, dtype=a.k_proj.weight.dtype)
    return sd


def build_identity(source_model, model_type: str, source_name: str) -> CllaForCausalLM:
    """The identity model; its parameters are the source's own tensors where the two agree (see own_weights)."""
    from .build import no_init_weights

    config = identity_config(source_model.config, model_type, source_name)
    with no_init_weights():  # every weight is assigned below
        model = CllaForCausalLM(config)
    sd = identity_state_dict(source_model, config)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise KvconvertError(f"identity conversion: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.to(source_model.dtype).eval()


def own_weights(model: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """`model` with its own copy of every parameter that shares memory with `source`'s (the builds share them):
    training it then leaves the source, its teacher, as it was. In place; returns the model."""
    theirs = {p.untyped_storage().data_ptr() for p in source.parameters()}
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.untyped_storage().data_ptr() in theirs:
                    setattr(module, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model
