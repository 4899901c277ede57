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
    """Augmented weights (out, hidden+1) and the derived second moments of one source layer."""

    wq: torch.Tensor  # (H*D, h+1)
    wk: torch.Tensor  # (K*D, h+1)
    wv: torch.Tensor  # (K*D, h+1)
    wo: torch.Tensor  # (h, H*D)
    q_pair_energy: torch.Tensor  # (H, D/2): E|q pair i|², pre-RoPE (RoPE preserves pair norms)
    k_pair_energy: torch.Tensor  # (K, D/2)
    vscale: torch.Tensor  # (H,): E||Wo_h (v - E v)||²


def pair_energy(w: torch.Tensor, cov: torch.Tensor, heads: int, D: int) -> torch.Tensor:
    """E|z_i|² for each head and rotate-half pair i (dims i and i + D/2)."""
    e = ((w @ cov) * w).sum(1).view(heads, D)
    return e[:, : D // 2] + e[:, D // 2 :]


def layer_stats(layer, cal: Calibration, idx: int, H: int, K: int, D: int) -> LayerStats:
    a = layer.self_attn
    cov = cal.cov(idx, idx)
    wq, wk, wv = augmented(a.q_proj), augmented(a.k_proj), augmented(a.v_proj)
    wo = a.o_proj.weight.detach().double()
    mean_v = wv @ cov[:, -1]  # E[v] (the last column of the augmented moment is E[x̃])
    cov_v = wv @ cov @ wv.T - torch.outer(mean_v, mean_v)  # (K*D, K*D) centered
    per = H // K
    vscale = torch.empty(H, dtype=torch.float64)
    for h in range(H):
        k = h // per
        wo_h = wo[:, h * D : (h + 1) * D]
        block = cov_v[k * D : (k + 1) * D, k * D : (k + 1) * D]
        vscale[h] = torch.trace(wo_h @ block @ wo_h.T)
    return LayerStats(wq, wk, wv, wo, pair_energy(wq, cov, H, D), pair_energy(wk, cov, K, D), vscale)
