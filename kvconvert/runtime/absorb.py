"""Weight absorption: the decode-time query and output projections of every layer, with the up-projections folded
in where that saves bytes (docs/design.md, "The plan (zero-shot)", absorption):
  q_lat[h] = W_uk[kv(h)]ᵀ q_nope[h]              (B, H, R)
  o_lat[h] = Σ_s softmax_s(q_lat·c_s + q_rope·k_rope_s) c_s   kernels.latent_decode: MQA over one latent stream
  v[h]     = W_uv[kv(h)] o_lat[h] + b_v          (a value bias passes through: the weights sum to 1)
A key bias adds q_nope·b_k to every score of a head: constant over positions, it cancels in the softmax.
A qk-norm source (Qwen3, Gemma 3): every layer caches its key norms r (B, S, K), which multiply kv head k's scores
(kernels' key_scale); queries are normed per head then mapped by q_map, with W_uk folded into that map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import apply_rope
from .layout import gemv_layout


@dataclass
class AbsorbedLayer:
    """The decode-time weights of one layer (built once from the model's weights).

    q_weight, q_bias: x -> per query head [q_a | q_rope], (H * (Q + Dr), hidden). When folding makes the weights
      smaller (R <= Dn, in bytes), W_uk is folded in: q_a = q_lat = W_uk[kv(h)]ᵀ W_q_nope[h] x (Q = R, w_uk None);
      otherwise q_a = q_nope (Q = Dn) and w_uk (K, Dn, R) follows at run time.
    o_weight, o_bias: o_lat (H * R) -> hidden with W_uv folded into W_o, when that is smaller (R <= Dv); otherwise
      o_weight is None and w_uv_t (K, R, Dv), b_uv (H * Dv) then the model's o_proj follow.
    """

    q_weight: torch.Tensor
    q_bias: torch.Tensor | None
    q_width: int
    w_uk: torch.Tensor | None
    o_weight: torch.Tensor | None
    o_bias: torch.Tensor | None
    w_uv_t: torch.Tensor | None
    b_uv: torch.Tensor | None
    window: int | None
    q_norm: nn.Module | None = None  # qk-norm sources: the per-head query norm over q_weight's D dims per head,
    q_map: torch.Tensor | None = None  # then (H, Q + Dr, D) into [q_a | q_rope] (W_uk folded in when Q = R)
    # A key bias under a key norm no longer cancels: its score term (q_nope · b_k) r_s, per head, is
    # key_bias_q[h] · (normed query) (H, D)
    key_bias_q: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor | None]:
        """The tensors this layer holds: folded copies, or views of the model's weights."""
        return [self.q_weight, self.q_bias, self.w_uk, self.o_weight, self.o_bias, self.w_uv_t, self.b_uv, self.q_map,
                self.key_bias_q]


def absorb_layer(attn, cfg, window: int | None) -> AbsorbedLayer:
    """Fold the up-projections of one CllaAttention into its query and output projections where that saves bytes
    (exact up to float rounding: folded in fp32, stored in the model's dtype). What is not folded stays a view of
    the model's own weights: the runtime holds no second copy of them."""
    H, K, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    Dn, Dr, Dv, R = cfg.qk_nope_dim, cfg.rope_dim, cfg.head_dim, attn.v_up.in_features  # R: this group's latent
    G = H // K
    dtype = attn.q_proj.weight.dtype
    cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
    q_weight, q_bias, q_width = attn.q_proj.weight, attn.q_proj.bias, Dn
    w_uk = attn.k_up.weight.view(K, Dn, R) if Dn else None
    q_map = attn.q_map
    key_bias_q = None
    if q_map is not None and Dn > 0 and attn.k_up.bias is not None:
        b_k = attn.k_up.bias.float().view(K, Dn).repeat_interleave(G, 0)  # (H, Dn)
        key_bias_q = cast(torch.einsum("hd,hde->he", b_k, q_map.float()[:, :Dn]))
    if q_map is not None and Dn > 0 and R <= Dn:  # the map is applied per token anyway: fold W_uk when not wider
        uk = w_uk.float().repeat_interleave(G, 0)
        qm = q_map.float()
        q_map = cast(torch.cat((torch.einsum("hdr,hde->hre", uk, qm[:, :Dn]), qm[:, Dn:]), 1))
        q_width, w_uk = R, None
    elif Dn > 0 and q_map is None and H * R * hidden <= H * Dn * hidden + K * Dn * R:
        uk = w_uk.float().repeat_interleave(G, 0)  # (H, Dn, R): query head h reads kv head h // G
        wq = attn.q_proj.weight.float().view(H, Dn + Dr, hidden)
        q_weight = cast(torch.cat((torch.einsum("hdr,hdi->hri", uk, wq[:, :Dn]), wq[:, Dn:]), 1).reshape(-1, hidden))
        if q_bias is not None:
            bq = q_bias.float().view(H, Dn + Dr)
            q_bias = cast(torch.cat((torch.einsum("hdr,hd->hr", uk, bq[:, :Dn]), bq[:, Dn:]), 1).reshape(-1))
        q_width, w_uk = R, None
    w_uv = attn.v_up.weight.view(K, Dv, R)
    b_uv = attn.v_up.bias.view(K, 1, Dv).expand(K, G, Dv).reshape(H * Dv) if attn.v_up.bias is not None else None
    if H * R * hidden <= H * Dv * hidden + K * Dv * R:
        wo = attn.o_proj.weight.float()
        o_weight = torch.einsum("ihd,hdr->ihr", wo.view(hidden, H, Dv), w_uv.float().repeat_interleave(G, 0))
        o_bias = attn.o_proj.bias.float() if attn.o_proj.bias is not None else None
        if b_uv is not None:  # the value bias passes through attention unchanged, then through W_o
            o_bias = (0 if o_bias is None else o_bias) + wo @ b_uv.float()
        return AbsorbedLayer(q_weight, q_bias, q_width, w_uk, cast(o_weight.reshape(hidden, H * R)), cast(o_bias),
                             None, None, window, attn.q_norm, q_map, key_bias_q)
    return AbsorbedLayer(q_weight, q_bias, q_width, w_uk, None, None, w_uv.transpose(1, 2), b_uv, window, attn.q_norm,
                         q_map, key_bias_q)


class AbsorbedProjections:
    """Every layer's AbsorbedLayer, and the two computations around latent attention that decode and the absorbed
    prompt path share: the queries (`queries`) and the output projection (`output`)."""

    def __init__(self, model, cpu_layout: bool = False, rope_from_latent=None):
        """cpu_layout: store the folded weights for matrix-vector products (runtime/layout.py); rope_from_latent:
        the runtime's RopeFromLatent (rope_keys.py), which rotates decode's rope queries, or None."""
        cfg = model.config
        H, Hr, Dr = cfg.num_attention_heads, cfg.rope_heads, cfg.rope_dim
        self.dims = (H, cfg.num_key_value_heads, Hr, Dr, cfg.head_dim)  # the latent's width is each layer's own
        self.softmax_scale = cfg.softmax_scale
        self.o_proj = [layer.self_attn.o_proj for layer in model.model.layers]
        self.rope_from_latent = rope_from_latent
        with torch.no_grad():
            self.layers = [absorb_layer(layer.self_attn, cfg, cfg.layer_windows[i])
                           for i, layer in enumerate(model.model.layers)]
            if cpu_layout:  # the folded copies too (views of the model's weights follow its layout)
                for lay in self.layers:
                    lay.q_weight = gemv_layout(lay.q_weight)
                    lay.o_weight = None if lay.o_weight is None else gemv_layout(lay.o_weight)
            # Query head h scores against rope head h // (H / Hr): its rope query is laid over the whole rope
            # stream (Hr * Dr values) and zero outside its own head, so one MQA kernel serves every rope layout.
            per = H // Hr if Dr else 1
            param = next(model.parameters())
            mask = torch.zeros(H, Hr * Dr, dtype=param.dtype, device=param.device)
            for h in range(H):
                r = h // per
                mask[h, r * Dr : (r + 1) * Dr] = 1
            self.rope_head_mask = mask

    def queries(self, i: int, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                rotations: torch.Tensor | None = None):
        """Layer i's absorbed queries of N tokens: x (N, hidden), cos/sin (N, Hr, 1, Dr) -> q_lat (N, H, R) or None,
        q_rope (N, H, Hr * Dr) or None (laid over the whole rope stream, zero outside the head's rope head), and the
        per-head score term of a key bias under key norms (N, H) fp32, or None. With `rotations` (N, Hr, Dr/2)
        complex instead of cos/sin (decode of rope keys from the latent), the rope dims come in pair order, rotated
        by them."""
        N = x.shape[0]
        H, K, Hr, Dr, _ = self.dims
        lay = self.layers[i]
        Q = lay.q_width
        q = F.linear(x, lay.q_weight, lay.q_bias).view(N, H, -1)
        head_bias = None
        if lay.q_norm is not None:
            q = lay.q_norm(q)
            if lay.key_bias_q is not None:
                head_bias = (q.float() * lay.key_bias_q.float()).sum(-1)
            q = torch.matmul(lay.q_map, q[..., None])[..., 0]  # (N, H, Q + Dr)
        q_lat = None
        if Q:
            q_lat = q[..., :Q]
            if lay.w_uk is not None:
                q_lat = torch.matmul(q_lat.reshape(N, K, H // K, Q), lay.w_uk).view(N, H, -1)
        q_rope = None
        if Dr and rotations is not None:  # rotated in fp32, then in the queries' dtype (the kernels' dot operands)
            q_rope = self.rope_from_latent.rotate_queries(q[..., Q:].reshape(N, Hr, H // Hr, Dr), rotations)
            q_rope = q_rope.view(N, H, Dr).to(q.dtype)
        elif Dr:
            q_rope = apply_rope(q[..., Q:].reshape(N, Hr, H // Hr, Dr), cos, sin).view(N, H, Dr)
        if Dr and Hr > 1:
            q_rope = torch.cat([q_rope] * Hr, -1) * self.rope_head_mask  # (cat: faster than repeat on CPU)
        return q_lat, q_rope, head_bias

    def output(self, i: int, o_lat: torch.Tensor) -> torch.Tensor:
        """Layer i's output projection of absorbed attention outputs: o_lat (N, H, R) -> (N, hidden), through W_o
        with W_uv folded in, or W_uv (+ the value bias) then the model's o_proj."""
        lay = self.layers[i]
        N = o_lat.shape[0]
        H, K, _, _, Dv = self.dims
        R = o_lat.shape[-1]
        if lay.o_weight is not None:
            return F.linear(o_lat.reshape(N, H * R), lay.o_weight, lay.o_bias)
        per_kv = o_lat.view(N, K, H // K, R).transpose(0, 1).reshape(K, -1, R)  # a view when N == 1 (decode)
        v = torch.bmm(per_kv, lay.w_uv_t).view(K, N, H // K, Dv).transpose(0, 1).reshape(N, H * Dv)
        if lay.b_uv is not None:
            v = v + lay.b_uv
        return self.o_proj[i](v)
