"""CllaForCausalLM: the Cross-Layer Latent Attention model (training and evaluation forward, HF generate).

Per layer group g, from the normalized input x of the group's first layer (B, T, hidden):
  c   = fake_quant(kv_down[g](x))                 (B, T, R)       the cached latent (per segment: head, tail)
  k_r = RoPE(rope_proj[g](x))                     (B, Hr, T, Dr)  the cached rope keys
  (rope_from_latent: no rope keys are cached; layer l's are RoPE(rope_up[l](c)) at each key's position)
Per layer l of the group:
  q            = q_proj(x_l)                      (B, H, T, Dn + Dr)  = [q_nope | q_rope]
  k_nope, v    = k_up[l](c), v_up[l](c)           (B, K, S, Dn), (B, K, S, Dv), repeated to H heads (GQA)
  scores       = q_nope · k_nope + RoPE(q_rope) · k_r   (query head h reads rope head h // (H / Hr))
With qk_norm (Qwen3, Gemma 3) queries are normed per head then mapped into [q_nope | q_rope] by q_map[h], and the
scores of kv head k at position s are multiplied by its cached key norm r_l[s, k] (see CllaConfig).
This path reconstructs keys/values (simple, exact); the runtime's absorbed decode reads the latent directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import CllaConfig
from .quant import fake_quantize, fake_quantize_latent


class CllaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op for the same arithmetic (CPU decode is bound by op count)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_inv_freq(config: CllaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """(NG, Hr, Dr/2) fp32: per layer group and rope head, the kept RoPE frequencies."""
    return torch.tensor(
        [[[config.rope_inv_freq[i] for i in f] for f in heads] for heads in config.rope_freq_index],
        dtype=torch.float32,
        device=device,
    )


def rope_cos_sin(
    config: CllaConfig, position_ids: torch.Tensor, dtype: torch.dtype, inv: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (NG, B, Hr, T, Dr): per layer group, the kept frequencies of each rope head
    (rotate-half layout). `inv`: the table of `rope_inv_freq`, when the caller keeps it on the device."""
    if inv is None:
        inv = rope_inv_freq(config, position_ids.device)
    freqs = position_ids.float()[None, :, None, :, None] * inv[:, None, :, None, :]  # (NG, B, Hr, T, Dr/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    scale = config.rope_attention_scaling
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class CllaLatentProjection(nn.Module):
    """One per layer group: what the cache stores, computed from the group's first-layer input."""

    def __init__(self, config: CllaConfig, group: int = 0):
        super().__init__()
        self.config = config
        self.segments = config.group_segments(group)
        R = config.kv_latent_dims[group]
        self.kv_down = nn.Linear(config.hidden_size, R, bias=False)
        self.rope_proj = (
            nn.Linear(config.hidden_size, config.rope_heads * config.rope_dim, bias=config.qkv_bias)
            if config.rope_dim and not config.rope_from_latent
            else None
        )
        # DeepSeek's kv_a_layernorm: the latent is normed before it is cached
        self.latent_norm = CllaRMSNorm(R, config.rms_norm_eps) if config.latent_norm else None

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) -> the latent as it is cached, before quantization (B, T, R)."""
        c = self.kv_down(x)
        return self.latent_norm(c) if self.latent_norm is not None else c

    def rope_keys(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) -> rope keys before RoPE, (B, T, Hr, Dr)."""
        cfg = self.config
        return self.rope_proj(x).view(*x.shape[:2], cfg.rope_heads, cfg.rope_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) -> latent (B, T, R) quantized as cached, rope keys (B, Hr, T, Dr) after RoPE. With
        rope_from_latent, in the rope keys' place, the rotations of these positions: [cos | sin] (B, Hr, T, 2 Dr),
        with which each layer rotates its rope keys from the latent (see CllaAttention.rope_keys)."""
        cfg = self.config
        B, T, _ = x.shape
        latent = fake_quantize_latent(self.latent(x), self.segments, cfg.kv_quant_group)
        if cfg.rope_from_latent:
            return latent, torch.cat([cos, sin], -1)
        if self.rope_proj is None:
            return latent, x.new_zeros(B, 1, T, 0)
        k_rope = self.rope_keys(x).transpose(1, 2)
        k_rope = fake_quantize(apply_rope(k_rope, cos, sin), cfg.rope_bits, cfg.rope_quant_group)
        return latent, k_rope


class CllaKeyScale(nn.Module):
    """A layer's key norm as one scalar per token and kv head: gain[k] / RMS(W_k x) over the head's raw key dims
    (the source's per-dim key-norm gain is folded into the key weights instead)."""

    def __init__(self, config: CllaConfig):
        super().__init__()
        K, D = config.num_key_value_heads, config.head_dim
        self.proj = nn.Linear(config.hidden_size, K * D, bias=config.qkv_bias)  # the source's raw key projection
        self.gain = nn.Parameter(torch.ones(K))
        self.heads, self.eps = K, config.rms_norm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, K) in x's dtype (computed in fp32). The runtime stores it in 16 bits (like a
        16-bit latent, that rounding is not modelled here: the identity plan stays exact in fp32)."""
        k = self.proj(x).view(*x.shape[:2], self.heads, -1).float()
        return (self.gain.float() * torch.rsqrt(k.pow(2).mean(-1) + self.eps)).to(x.dtype)


class CllaAttention(nn.Module):
    def __init__(self, config: CllaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        H, K = config.num_attention_heads, config.num_key_value_heads
        R = config.kv_latent_dims[config.group_of_layer()[layer_idx]]  # the latent of this layer's group
        Dn, Dr, Dv = config.qk_nope_dim, config.rope_dim, config.head_dim
        D = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, H * (D if config.qk_norm else Dn + Dr), bias=config.qkv_bias)
        self.k_up = nn.Linear(R, K * Dn, bias=config.qkv_bias) if Dn else None
        # rope_from_latent: this layer's pre-RoPE rope keys from the latent
        self.rope_up = nn.Linear(R, config.rope_heads * Dr, bias=config.qkv_bias) if config.rope_from_latent else None
        self.v_up = nn.Linear(R, K * Dv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * Dv, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:  # the source's per-head query norm, then into the plan's query dims; the key norm
            self.q_norm = CllaRMSNorm(D, config.rms_norm_eps)
            self.q_map = nn.Parameter(torch.eye(Dn + Dr, D).expand(H, -1, -1).clone())
            self.k_scale = CllaKeyScale(config)
        else:
            self.q_norm = self.q_map = self.k_scale = None

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) -> (B, T, H, Dn + Dr): [q_nope | q_rope] before RoPE."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.config.num_attention_heads, -1)
        if self.q_norm is None:
            return q
        return torch.einsum("bthd,hed->bthe", self.q_norm(q), self.q_map.to(q.dtype))

    def rope_keys(self, latent: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """rope_from_latent: this layer's rope keys (B, Hr, S, Dr) from the latent (B, S, R), rotated by
        rotations = [cos | sin] (B, Hr, S, 2 Dr) of each key's position."""
        B, S, _ = latent.shape
        cfg = self.config
        k = self.rope_up(latent).view(B, S, cfg.rope_heads, cfg.rope_dim).transpose(1, 2)
        cos, sin = rotations.to(k.dtype).chunk(2, -1)
        return apply_rope(k, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        key_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, hidden); latent (B, S, R); k_rope (B, Hr, S, Dr) (rope_from_latent: the keys' rotations, see
        CllaLatentProjection.forward); cos/sin (B, Hr, T, Dr); mask (B, 1, T, S) additive,
        or None for causal attention when S == T; key_scale (B, K, S): the key norms (qk_norm), else None."""
        cfg = self.config
        B, T, _ = x.shape
        S = latent.shape[1]
        H, K = cfg.num_attention_heads, cfg.num_key_value_heads
        Dn, Dr, Dv = cfg.qk_nope_dim, cfg.rope_dim, cfg.head_dim
        q = self.queries(x).transpose(1, 2)
        v = self.v_up(latent).view(B, S, K, Dv).transpose(1, 2).repeat_interleave(H // K, dim=1)
        q_parts, k_parts = [], []
        if Dn:
            q_parts.append(q[..., :Dn])
            k_nope = self.k_up(latent).view(B, S, K, Dn).transpose(1, 2)
            k_parts.append(k_nope.repeat_interleave(H // K, dim=1))
        if Dr:
            per = H // cfg.rope_heads
            if self.rope_up is not None:
                k_rope = self.rope_keys(latent, k_rope)
            q_parts.append(apply_rope(q[..., Dn:], cos.repeat_interleave(per, 1), sin.repeat_interleave(per, 1)))
            k_parts.append(k_rope.repeat_interleave(per, dim=1))
        q = torch.cat(q_parts, -1) if len(q_parts) > 1 else q_parts[0]
        k = torch.cat(k_parts, -1) if len(k_parts) > 1 else k_parts[0]
        if key_scale is not None:  # the key norm scales every key dim of its kv head
            k = k * key_scale.repeat_interleave(H // K, dim=1)[..., None].to(k.dtype)
        # Fused SDPA kernels (flash on CPU and GPU) want one head dim for q, k and v: zero-pad the narrower side (zero
        # dims change no score; padded value dims are cut off), so that a fused kernel runs, not the unfused fallback.
        dqk, dv = q.shape[-1], v.shape[-1]
        if dv < dqk:
            v = F.pad(v, (0, dqk - dv))
        elif dqk < dv:
            q, k = F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
        # mask None: plain causal attention over the same T positions (the runtime's first prefill chunk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=cfg.softmax_scale)
        out = out[..., :dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * Dv))


class CllaMLP(nn.Module):
    def __init__(self, config: CllaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CllaDecoderLayer(nn.Module):
    def __init__(self, config: CllaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = CllaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CllaAttention(config, layer_idx)
        self.post_attention_layernorm = CllaRMSNorm(config.hidden_size, config.rms_norm_eps)  # the pre-MLP norm
        self.mlp = CllaMLP(config)
        if config.sandwich_norms:  # Gemma: the attention's and the MLP's outputs are normed before the residual add
            self.attn_out_norm = CllaRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp_out_norm = CllaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sandwich = config.sandwich_norms

    def attn_residual(self, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        return h + (self.attn_out_norm(attn_out) if self.sandwich else attn_out)

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        out = self.mlp(self.post_attention_layernorm(h))
        return h + (self.mlp_out_norm(out) if self.sandwich else out)

    def forward(self, h, latent, k_rope, cos, sin, mask, latent_proj=None, cache=None, group: int = 0):
        """h (B, T, hidden) -> (h, latent, k_rope). The group's first layer passes its `latent_proj`: the latent and
        rope keys are computed from this layer's normed input (and appended to `cache`); later layers reuse them.
        A layer's key norms (qk_norm) are its own: cached at index num_layer_groups + layer."""
        x = self.input_layernorm(h)
        if latent_proj is not None:
            latent, k_rope = latent_proj(x, cos, sin)
            if cache is not None:
                latent4, k_rope = cache.update(latent[:, None], k_rope, group)
                latent = latent4[:, 0]
        attn = self.self_attn
        key_scale = None
        if attn.k_scale is not None:
            key_scale = attn.k_scale(x).transpose(1, 2)  # (B, K, T)
            if cache is not None:
                B, _, T = key_scale.shape
                cached, _ = cache.update(key_scale[..., None], key_scale.new_zeros(B, 1, T, 0),
                                         attn.config.num_layer_groups + attn.layer_idx)
                key_scale = cached[..., 0]
        h = self.attn_residual(h, attn(x, latent, k_rope, cos, sin, mask, key_scale))
        return self.mlp_residual(h), latent, k_rope


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    past_len: int,
    window: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask (B, 1, T, S) over cache positions: causal, optional sliding window, padding (0 = pad).

    Fully masked rows (queries at left-padding positions) get a finite minimum everywhere, so they stay finite.
    """
    S = past_len + q_len
    q_idx = torch.arange(past_len, S, device=device)[:, None]
    k_idx = torch.arange(S, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None, None].expand(batch, 1, q_len, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -S:].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class CllaPreTrainedModel(PreTrainedModel):
    config_class = CllaConfig
    config: CllaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CllaDecoderLayer"]


class CllaModel(CllaPreTrainedModel):
    def __init__(self, config: CllaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([CllaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.latent_proj = nn.ModuleList([CllaLatentProjection(config, g) for g in range(config.num_layer_groups)])
        self.norm = CllaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        scale = self.config.embed_scale
        return h if scale == 1.0 else h * torch.tensor(scale, dtype=h.dtype)  # rounded to the dtype, as Gemma does

    def attention_inputs(self, h: torch.Tensor, past: int = 0, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """cos, sin (per layer group, see rope_cos_sin) and the additive masks (per sliding window, None for full
        attention) of hidden states h (B, T, hidden) that follow `past` cached positions."""
        cfg = self.config
        B, T, _ = h.shape
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=h.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(cfg, position_ids, h.dtype)
        # No padding, nothing cached, no window inside the chunk: plain causal attention (mask None), which SDPA
        # runs without materialising a (T, S) mask and skips the blocks above the diagonal (1.7x faster on CPU at 2k)
        masks = {
            w: None if attention_mask is None and past == 0 and (w is None or w >= T)
            else build_attention_mask(attention_mask, B, T, past, w, h.dtype, h.device) for w in set(cfg.layer_windows)
        }
        return cos, sin, masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, Cache | None, tuple[torch.Tensor, ...] | None]:
        """Final normed hidden (B, T, hidden), the cache, and (with output_hidden_states) the embeddings then
        each layer's output, as transformers orders them (the last entry is the final normed hidden)."""
        cfg = self.config
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache()
        if cache is not None and cfg.qk_norm:  # key norms sit past the groups' entries (see CllaDecoderLayer)
            while len(cache.layers) < cfg.num_layer_groups + cfg.num_hidden_layers:
                cache.layers.append(DynamicLayer())
        past = cache.get_seq_length(0) if cache is not None else 0
        cos, sin, masks = self.attention_inputs(h, past, attention_mask, position_ids)
        group_of = cfg.group_of_layer()
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        hidden_states = [h] if output_hidden_states else None
        latent = k_rope = None
        for i, layer in enumerate(self.layers):
            g = group_of[i]
            proj = self.latent_proj[g] if i == cfg.layer_groups[g][0] else None
            args = (h, latent, k_rope, cos[g], sin[g], masks[cfg.layer_windows[i]], proj)
            if checkpointing and cache is None:
                # Recompute the layer in backward; the group's latent is an input of its later layers.
                h, latent, k_rope = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                h, latent, k_rope = layer(*args, cache, g)
            if hidden_states is not None:
                hidden_states.append(h)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states[-1] = h
        return h, cache, tuple(hidden_states) if hidden_states is not None else None


class CllaForCausalLM(CllaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CllaConfig):
        super().__init__(config)
        self.model = CllaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab); `labels` (B, T) gives the mean next-token cross-entropy (-100 ignored)."""
        cache = cache if cache is not None else past_key_values
        hidden, cache, hidden_states = self.model(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, output_hidden_states
        )
        if isinstance(logits_to_keep, torch.Tensor):  # positions to keep, as transformers takes them
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, hidden_states=hidden_states)
