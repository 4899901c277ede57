"""RoPE split: which frequency pairs keep their rotation (cached as rope keys), shared across a group's layers.

Dropping the rotation of pair i turns its q·k term into a position-free one; for a query-key distance Δ the
score moves by Re(z_q z̄_k (e^{iθΔ} - 1)), whose mean square is |z_q|²|z_k|² (1 - E cos θΔ). Low frequencies
barely rotate and lose little; pairs with large |q||k| (MHA2MLA's 2-norm criterion) lose much. Δ is taken
uniform over [0, ROPE_DISTANCE].

A group caches one rope key per kv head, from its first layer. RoPE commutes with multiplication by a complex
number, so layer l's pair i key is approximated as M·s (s: the shared pair, M fitted by least squares on
calibration moments) and conj(M) is folded into layer l's query rows: nothing extra is cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibrate import Calibration
from .stats import LayerStats

ROPE_DISTANCE = 4096


def rotation_loss(inv_freq: list[float], distance: int = ROPE_DISTANCE) -> torch.Tensor:
    """1 - E[cos(θ Δ)] for Δ ~ U[0, distance], per frequency."""
    theta = torch.tensor(inv_freq, dtype=torch.float64) * distance
    return 1 - torch.where(theta > 1e-9, torch.sin(theta) / theta, torch.ones_like(theta))


@dataclass
class RopeChoice:
    freq: list[list[int]]  # per kv head: the kept pair indices, ascending
    maps: list[torch.Tensor]  # per layer of the group: (K, D/2) complex M (1 for the first layer)
    error: float  # expected squared attention-output change, summed over the group's layers
    kept_energy: float = 0.0  # query-weighted energy the rope keys carry (what their quantization noise scales)


def choose_rope(
    layers: list[int], stats: list[LayerStats], cal: Calibration, rope_dim: int, inv_freq: list[float],
    softmax_scale: float, H: int, K: int, D: int,
) -> RopeChoice:
    """Pick rope_dim/2 pairs per kv head for a group (layers: source indices; stats: their LayerStats)."""
    half, per, m = D // 2, H // K, rope_dim // 2
    rot = rotation_loss(inv_freq)
    f = layers[0]
    first = stats[0]
    s_energy = first.k_pair_energy.clamp_min(1e-12)  # (K, half)
    drop = torch.zeros(K, half, dtype=torch.float64)
    share = torch.zeros(K, half, dtype=torch.float64)
    maps = []
    for l, st in zip(layers, stats):
        # Query weight per (kv head, pair): s² Σ_h vscale_h E|q_h,i|²
        qw = (st.vscale[:, None] * st.q_pair_energy).view(K, per, half).sum(1) * softmax_scale**2
        drop += qw * st.k_pair_energy * rot
        if l == f:
            maps.append(torch.ones(K, half, dtype=torch.complex128))
            continue
        P = st.wk @ cal.cov(l, f) @ first.wk.T  # (K*D, K*D): E[k_l k_fᵀ]
        M = torch.empty(K, half, dtype=torch.complex128)
        for k in range(K):
            i = torch.arange(half) + k * D
            a_l, b_l, a_f, b_f = i, i + half, i, i + half
            re = P[a_l, a_f] + P[b_l, b_f]
            im = P[b_l, a_f] - P[a_l, b_f]
            M[k] = torch.complex(re, im) / s_energy[k]
            share[k] += qw[k] * (st.k_pair_energy[k] - (re**2 + im**2) / s_energy[k]).clamp_min(0)
        maps.append(M)
    benefit = drop - share
    freq, error, kept_energy = [], 0.0, 0.0
    for k in range(K):
        keep = sorted(torch.argsort(benefit[k], descending=True)[:m].tolist()) if m else []
        kept = torch.zeros(half, dtype=torch.bool)
        kept[keep] = True
        error += drop[k][~kept].sum().item() + share[k][kept].sum().item()
        kept_energy += (drop[k] / rot.clamp_min(1e-12))[kept].sum().item()
        freq.append(keep)
    return RopeChoice(freq, maps, error, kept_energy)


def nope_dims(keep: list[int], D: int) -> list[int]:
    """Key dims of one head that lose their rotation: [a_i for dropped i] + [b_i for dropped i]."""
    half = D // 2
    dropped = [i for i in range(half) if i not in set(keep)]
    return dropped + [i + half for i in dropped]


def rope_dims(keep: list[int], D: int) -> list[int]:
    """Key dims of one head that keep RoPE, in the rotate-half layout of the rope key."""
    return list(keep) + [i + D // 2 for i in keep]


def fold_map_into_query(wq_head: torch.Tensor, keep: list[int], M: torch.Tensor, D: int) -> torch.Tensor:
    """Rope rows of one query head (rotate-half layout over `keep`) times conj(M) per pair:
    q'_a = Re(M) q_a + Im(M) q_b, q'_b = Re(M) q_b - Im(M) q_a. wq_head: (D, h+1) augmented rows."""
    half = D // 2
    a = wq_head[keep]
    b = wq_head[[i + half for i in keep]]
    mr, mi = M[keep].real[:, None], M[keep].imag[:, None]
    return torch.cat([mr * a + mi * b, mr * b - mi * a], 0)


@dataclass
class SharedRope:
    """One rope head for all kv heads and layers of a group (rope_heads = 1).

    Per kept pair i, the keys z_{l,k,i} of every layer l and kv head k are approximated as u_{l,k,i} · s_i with
    s_i = c_i^H ẑ_i (ẑ: the keys predicted from x_f): a weighted complex PCA (the idea of TransMLA's RoRoPE,
    extended across layers). conj(u) folds into the queries; the residual z - u s of every pair joins the
    position-free latent targets.
    """

    freq: list[int]  # kept pair indices, ascending
    u: torch.Tensor  # (G, K, D/2) complex (0 for dropped pairs)
    ws: torch.Tensor  # (rope_dim, h+1) real rows on x̃_f, rotate-half layout
    error: float  # rotation loss of everything left position-free
    kept_energy: float = 0.0  # query-weighted energy the rope key carries


def choose_shared_rope(
    layers: list[int], stats: list[LayerStats], cal: Calibration, rope_dim: int, inv_freq: list[float],
    softmax_scale: float, H: int, K: int, D: int, select: bool = True,
) -> SharedRope:
    """select=False keeps the rope_dim/2 highest frequencies instead of the most useful pairs (ablation)."""
    half, per, m, G = D // 2, H // K, rope_dim // 2, len(layers)
    f = layers[0]
    rot = rotation_loss(inv_freq)
    cf = cal.cov(f, f)
    # Rows that predict each layer's keys from x̃_f: wk_l E[x̃_l x̃_fᵀ] E[x̃_f x̃_fᵀ]^-1 (exact for the first layer).
    pred = [st.wk if l == f else st.wk @ cal.cov(l, f) @ cal.cov_pinv(f) for l, st in zip(layers, stats)]
    qw = torch.stack(
        [(st.vscale[:, None] * st.q_pair_energy).view(K, per, half).sum(1) * softmax_scale**2 for st in stats]
    )  # (G, K, half)
    k_energy = torch.stack([st.k_pair_energy for st in stats])  # (G, K, half)
    P = torch.cat(pred)  # (G*K*D, h+1)
    M2 = P @ cf @ P.T  # second moments of the predicted keys
    # Per pair i (all pairs at once, batched): over the (layer, kv head) keys ẑ of the pair, E[ẑ ẑ^H] weighted by
    # the queries that read them; its top eigenvector is the shared key's direction.
    a = (torch.arange(G * K) // K * K * D + torch.arange(G * K) % K * D)[None, :] + torch.arange(half)[:, None]
    b = a + half  # (half, G*K) row indices of the pair's real and imaginary parts

    def block(r, c):
        return M2[r[:, :, None], c[:, None, :]]
    sigma = torch.complex(block(a, a) + block(b, b), block(b, a) - block(a, b))  # (half, GK, GK) E[ẑ ẑ^H]
    w = qw.permute(2, 0, 1).reshape(half, G * K).clamp_min(1e-30).sqrt()
    lam, vec = torch.linalg.eigh(w[:, :, None] * sigma * w[:, None, :])
    v = vec[..., -1]  # (half, GK)
    captured = lam[:, -1].clamp_min(0)
    coef = (v.conj() * w).T  # (GK, half): s = Σ coef · ẑ
    u = (v / w).T.reshape(G, K, half).clone()
    total = (qw * k_energy).sum((0, 1))  # (half,)
    benefit = captured * rot
    keep = sorted(torch.argsort(benefit, descending=True)[:m].tolist()) if select else list(range(m))
    kept = torch.zeros(half, dtype=torch.bool)
    kept[keep] = True
    u[:, :, ~kept] = 0
    error = ((total - torch.where(kept, captured, torch.zeros_like(captured))) * rot).sum().item()
    # s_i = Σ c (a + i b) over (l, k): real rows s_a = Σ Re(c) a - Im(c) b, s_b = Σ Im(c) a + Re(c) b.
    rows_a, rows_b = [], []
    for i in keep:
        a = torch.tensor([g * K * D + k * D + i for g in range(G) for k in range(K)])
        c = coef[:, i]
        wa, wb = P[a], P[a + half]
        rows_a.append((c.real[:, None] * wa - c.imag[:, None] * wb).sum(0))
        rows_b.append((c.imag[:, None] * wa + c.real[:, None] * wb).sum(0))
    ws = torch.stack(rows_a + rows_b) if keep else torch.zeros(0, P.shape[1], dtype=torch.float64)
    return SharedRope(keep, u, ws, error, captured[kept].sum().item())


def complex_rows(u: torch.Tensor, keep: list[int], ws: torch.Tensor, D: int) -> torch.Tensor:
    """(D, h+1) rows of u·s for one (layer, kv head) in the source's rotate-half dim order (0 on dropped pairs)."""
    half, m = D // 2, len(keep)
    out = torch.zeros(D, ws.shape[1], dtype=torch.float64)
    for j, i in enumerate(keep):
        sa, sb = ws[j], ws[m + j]
        ur, ui = u[i].real, u[i].imag
        out[i] = ur * sa - ui * sb
        out[i + half] = ui * sa + ur * sb
    return out
