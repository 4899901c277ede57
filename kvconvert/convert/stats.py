"""Per-layer statistics of the source that the compression steps share, from calibration second moments.

Every error is expressed in one unit: the expected squared change of a layer's attention output, to first order.
- A value error ε on kv head k moves the output of its query heads h by Wo_h ε: weight Ω_v = Σ_h Wo_hᵀ Wo_h.
- A score error δ moves the output by Σ_j p_j δ_j (Wo_h v_j - mean): weight E[δ²] · Var(Wo_h v) = E[δ²] · vscale_h.
  A key error e gives δ = s · q·e, so Ω_k = s² Σ_h vscale_h E[q_h q_hᵀ].
(The Σ_j p_j² factor that both share cancels in their relative weighting.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibrate import Calibration


def augmented(linear, rows: slice | None = None) -> torch.Tensor:
    """[W | b] in float64 (b = 0 when the layer has no bias)."""
    w = linear.weight.detach().double()
    b = linear.bias.detach().double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat([w, b[:, None]], 1)


@dataclass
class LayerStats:
    """Augmented weights (out, hidden+1) and the derived second moments of one source layer. wq and wo, the
    (h x h)-sized ones, are float32 (the source's precision: a conversion holds it in float32; wo is the source's own
    tensor): callers take their rows to float64. A float64 copy of both, for every layer, is about the size of the
    model's attention weights twice over."""

    wq: torch.Tensor  # (H*D, h+1) float32
    wk: torch.Tensor  # (K*D, h+1)
    wv: torch.Tensor  # (K*D, h+1)
    wo: torch.Tensor  # (h, H*D) float32: the source's o_proj weight
    q_pair_energy: torch.Tensor  # (H, D/2): E|q pair i|², pre-RoPE (RoPE preserves pair norms)
    k_pair_energy: torch.Tensor  # (K, D/2)
    vscale: torch.Tensor  # (H,): E||Wo_h (v - E v)||²
    key_norm: torch.Tensor | None = None  # (K,) qk-norm sources: E[1/RMS(raw key)²]^½, the scale folded into wk


def norm_scales(w: torch.Tensor, x: torch.Tensor, heads: int, eps: float, chunk: int = 4096) -> torch.Tensor:
    """(heads,) E[1 / (mean_d z_d² + eps)]^½ for z = w x̃ per head over calibration inputs x (N, hidden): the typical
    factor a per-head RMSNorm multiplies its raw input by."""
    total = torch.zeros(heads, dtype=torch.float64)
    for s in range(0, x.shape[0], chunk):
        xs = x[s : s + chunk].double()
        z = xs @ w[:, :-1].T + w[:, -1]
        total += (1 / (z.view(len(xs), heads, -1).pow(2).mean(-1) + eps)).sum(0)
    return (total / x.shape[0]).sqrt()


def pair_energy(w: torch.Tensor, cov: torch.Tensor, heads: int, D: int) -> torch.Tensor:
    """E|z_i|² for each head and rotate-half pair i (dims i and i + D/2)."""
    e = ((w @ cov) * w).sum(1).view(heads, D)
    return e[:, : D // 2] + e[:, D // 2 :]


def layer_stats(layer, cal: Calibration, idx: int, H: int, K: int, D: int, norm_gain=None, eps: float = 1e-6) -> LayerStats:
    """`norm_gain(norm) -> (D,)`: given for sources with per-head query and key norms (qk_norm), whose queries and
    keys are then described linearly as gain ⊙ (raw projection) times the typical 1/RMS of their head (the model
    applies the exact per-token norms; these weights set what the fits minimize)."""
    a = layer.self_attn
    cov = cal.cov(idx, idx)
    wq, wk, wv = augmented(a.q_proj), augmented(a.k_proj), augmented(a.v_proj)
    key_norm = None
    if norm_gain is not None:
        x = cal.inputs[idx]
        q_norm, key_norm = norm_scales(wq, x, H, eps), norm_scales(wk, x, K, eps)
        wq = wq * (q_norm.repeat_interleave(D) * norm_gain(a.q_norm).double().repeat(H))[:, None]
        wk = wk * (key_norm.repeat_interleave(D) * norm_gain(a.k_norm).double().repeat(K))[:, None]
    wo = a.o_proj.weight.detach()
    mean_v = wv @ cov[:, -1]  # E[v] (the last column of the augmented moment is E[x̃])
    cov_v = wv @ cov @ wv.T - torch.outer(mean_v, mean_v)  # (K*D, K*D) centered
    per = H // K
    vscale = torch.empty(H, dtype=torch.float64)
    for h in range(H):
        k = h // per
        wo_h = wo[:, h * D : (h + 1) * D].double()
        block = cov_v[k * D : (k + 1) * D, k * D : (k + 1) * D]
        vscale[h] = torch.trace(wo_h @ block @ wo_h.T)
    return LayerStats(wq.float(), wk, wv, wo, pair_energy(wq, cov, H, D), pair_energy(wk, cov, K, D), vscale,
                      key_norm)


def output_sensitivity(model, rows: torch.Tensor, mask: torch.Tensor | None = None, seed: int = 0) -> list[float]:
    """Per layer, how much a change of its attention output moves the model's predictions: the trace of the Fisher
    information of the scored tokens' next-token distributions with respect to that output, per hidden dim and per
    scored token (Σ over positions of E‖∂ log p(y) / ∂o‖² / hidden, y drawn from the model itself). To second order,
    an output error of expected squared size e at every position costs e × this / 2 nats of KL per scored token: the
    exchange rate between the proxy's units (convert/plan.py) of different layers. rows (P, L) tokens; mask (P, L)
    bool: the scored tokens (each predicted from the positions before it; None: every token but the first)."""
    layers = model.model.layers
    hidden = model.config.hidden_size
    total = [0.0] * len(layers)

    def keep(i):
        def hook(_module, _inputs, out):
            out.register_hook(lambda g: total.__setitem__(i, total[i] + g.double().pow(2).sum().item()))
        return hook

    handles = [layer.self_attn.o_proj.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # gradients of the outputs only
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    scored = 0
    try:
        with torch.enable_grad():
            for p in range(rows.shape[0]):
                t = rows[p : p + 1]
                m = torch.ones_like(t, dtype=torch.bool) if mask is None else mask[p : p + 1]
                where = m[0, 1:].nonzero().flatten()  # logits at position i predict token i + 1
                if not where.numel():
                    continue
                embeds = model.get_input_embeddings()(t).detach().requires_grad_(True)  # so the graph reaches o_proj
                logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=where).logits[0].float()
                logp = torch.log_softmax(logits, -1)
                y = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                logp.gather(1, y).sum().backward()
                scored += where.numel()
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    return [t / max(1, scored) / hidden for t in total]
