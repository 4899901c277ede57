"""The latent of a layer group: activation-aware, output-weighted reduced-rank regression.

From x_f (the normalized input of the group's first layer, hidden h) onto the stacked targets y of every layer
of the group (position-free key dims and values, biases left out: they are added exactly after the
up-projections), minimize E||Ω^{1/2}(y - A B x_f)||² over A (targets × R), B (R × h):
  T = E[y x_fᵀ] (targets × h), C = E[x_f x_fᵀ], Ci = C^{-1/2}
  Ci Tᵀ Ω T Ci = V S² Vᵀ (descending)  ->  B = S_R V_Rᵀ Ci,  A = T Ci V_R S_R^{-1}
For a group of one layer, T = W C and this is the activation-aware SVD of W (Ω-weighted). The latent
c = B x has E[c cᵀ] = S_R², and A is orthonormal in the Ω metric, so the error is E_total - Σ_{j≤R} S_j².
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

RIDGE = 1e-6  # relative floor on C's eigenvalues


@dataclass
class Block:
    """One target block y = w x̃_l - w_f x̃_f (rows of a layer's augmented k or v projection, less what the
    shared rope key already carries), with its weight Ω. The constant parts (biases) are added exactly."""

    layer: int
    kind: str  # "k" or "v"
    kv_head: int
    w: torch.Tensor  # (n, h+1) augmented rows on x̃_l
    omega: torch.Tensor  # (n, n)
    w_f: torch.Tensor | None = None  # (n, h+1) augmented rows on x̃_f, subtracted

    @property
    def bias(self) -> torch.Tensor:
        return self.w[:, -1] - (self.w_f[:, -1] if self.w_f is not None else 0)


@dataclass
class LatentFit:
    blocks: list[Block]
    S2: torch.Tensor  # (h,) descending
    V: torch.Tensor  # (h, rank): the eigenvectors of the nonzero S2 at most (rank: the targets' row count, ≤ h)
    Ci: torch.Tensor  # (h, h)
    T: torch.Tensor  # (targets, h)
    total: float  # E_total = Σ_b tr(Ω_b E[y_b y_bᵀ])
    mean2: torch.Tensor  # (h,) E[c_j]² of each latent dim (its constant part: see `spread`)

    def error(self, R: int) -> float:
        """Ω-weighted regression error of a rank-R latent (before quantization)."""
        return max(0.0, self.total - self.S2[:R].sum().item())

    def spread(self, lo: int, hi: int) -> float:
        """Energy of latent dims lo:hi less their constant part: `rotation` sends the first (largest) dim onto the
        constant direction, an offset that a token-wise min/max quantizer's zero-point holds almost exactly."""
        return (self.S2[lo:hi].sum() - self.mean2[lo:hi].sum()).clamp_min(0).item()

    def weights(self, R: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (targets × R) and B (R × h)."""
        S = self.S2[:R].sqrt()
        live = S > 1e-9 * S[0].clamp_min(1e-300)  # a latent wider than the targets' rank: unused dims stay 0
        VR = self.V[:, :R]
        if VR.shape[1] < R:  # dims past the targets' rank (S = 0): zero columns
            VR = torch.cat([VR, VR.new_zeros(VR.shape[0], R - VR.shape[1])], 1)
        VR = VR * live[None, :]
        B = S[:, None] * (VR.T @ self.Ci)
        A = self.T @ self.Ci @ VR / torch.where(live, S, torch.ones_like(S))[None, :]
        return A, B


def inverse_sqrt(C: torch.Tensor) -> torch.Tensor:
    w, U = torch.linalg.eigh(C)
    w = w.clamp_min(RIDGE * w.max())
    return (U * w.rsqrt()) @ U.T


def fit_latent(blocks: list[Block], cov, first: int, Ci: torch.Tensor | None = None,
               inputs: tuple[torch.Tensor, Callable[[int], torch.Tensor]] | None = None) -> LatentFit:
    """cov(i, j) -> augmented E[x̃_i x̃_jᵀ]; `first` is the group's first layer; Ci = C^{-1/2} if known.
    `inputs`: the latent's input is not the source's x̃_first but another (the converted model's own, see
    kvconvert.convert.sequential): (its augmented moment E[x̃ x̃ᵀ], l -> the augmented cross moment E[x̃_l x̃ᵀ])."""
    C_in, cross_in = inputs if inputs is not None else (cov(first, first), lambda layer: cov(layer, first))
    h = blocks[0].w.shape[1] - 1
    C = C_in[:h, :h]
    Ci = inverse_sqrt(C) if Ci is None else Ci
    Ts, gram, total = [], torch.zeros(h, h, dtype=torch.float64), 0.0
    for b in blocks:
        W = b.w[:, :h]
        T = W @ cross_in(b.layer)[:h, :h]
        Eyy = W @ cov(b.layer, b.layer)[:h, :h] @ W.T
        if b.w_f is not None:
            Wf = b.w_f[:, :h]
            cross = W @ cross_in(b.layer)[:h, :h] @ Wf.T
            T = T - Wf @ C
            Eyy = Eyy - cross - cross.T + Wf @ C @ Wf.T
        Ts.append(T)
        gram += T.T @ b.omega @ T
        total += torch.trace(b.omega @ Eyy).item()
    S2, V = torch.linalg.eigh(Ci @ gram @ Ci)
    order = torch.argsort(S2, descending=True)
    S2, V = S2[order].clamp_min(0), V[:, order]
    mean = C_in[:h, h]  # E[x_f] (the augmented moment's last column)
    mean2 = (S2.sqrt() * (V.T @ Ci @ mean)) ** 2  # (B E[x_f])² per latent dim, B = S Vᵀ Ci
    # Ci Tᵀ Ω T Ci has rank at most the targets' rows: the eigenvectors past them carry S2 = 0 and are not kept
    rank = min(h, sum(b.w.shape[0] for b in blocks))
    return LatentFit(blocks, S2, V[:, :rank].contiguous(), Ci, torch.cat(Ts), total, torch.minimum(mean2, S2))


def rotation(R: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal R×R matrix that spreads outliers over all latent dims before quantization: a normalized
    Hadamard matrix when R is a power of two, a seeded random orthogonal matrix otherwise. Either way its first
    column is constant (1/√R): the latent's first dim, its largest, often mostly a constant offset (the keys' mean,
    when rope keys go through the latent), lands on every dim alike, an offset a min/max quantizer's zero-point holds
    exactly, where a random direction would spread it unevenly and cost every token resolution."""
    if R & (R - 1) == 0:
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < R:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        return H / R**0.5
    g = torch.Generator().manual_seed(seed)
    Q, Rm = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(Rm))[None, :]
    # A Householder reflection that takes Q's first column onto the constant direction keeps Q orthogonal
    ones = torch.full((R,), R**-0.5, dtype=torch.float64)
    v = Q[:, 0] - ones
    if v.norm() > 1e-12:
        v = v / v.norm()
        Q = Q - 2 * torch.outer(v, v @ Q)
    return Q
