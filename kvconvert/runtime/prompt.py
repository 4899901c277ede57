"""Prompt (prefill) attention: which slots each new token sees (`PromptMasks`), absorbed prompt attention, and the
attention a score-based cache policy learns from a prompt.

Absorbed prompt attention is MQA over the latent, as decode computes it, batched over the step's T tokens; the
runtime takes it where its head dims are narrower than those of the model's own attention over reconstructed keys
and values (LatentRuntime.absorbed_prefill).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .absorb import AbsorbedProjections
from ..cache_layout import ring_positions
from .cache import LatentCache


class PromptMasks:
    """The slots each of a prefill step's T new tokens sees, per layer. Slot s is visible to new token t of row b
    iff s <= start[b] + t and, in a window, its token is recent. With a policy, slots are not positions: a window is
    judged on each group's slot positions; a ring's slots hold the positions that wrapped onto them. Every other
    mask is the same for all groups, so layers share the masks that agree."""

    def __init__(self, config, cache: LatentCache, policy, start: torch.Tensor, positions: torch.Tensor, S: int,
                 fresh: bool, dtype: torch.dtype):
        """start (B,) int32: each row's first new slot; positions (B, T) int64: the new tokens' positions; S: the
        slots the step reads; fresh: every row starts at slot 0 (right-padded rows: plain causal attention)."""
        self.config, self.cache, self.policy = config, cache, policy
        self.group_of = config.group_of_layer()
        device = start.device
        T = positions.shape[1]
        key = torch.arange(S, device=device)[None, None, :]
        qslot = start.long()[:, None, None] + torch.arange(T, device=device)[None, :, None]
        qpos = positions[:, :, None]
        after = (start.long() + T)[:, None, None]  # every row wrote T slots (padding included)
        fill = torch.finfo(dtype).min
        self.allowed: dict[tuple, torch.Tensor] = {}  # (B, T, S) bool
        self.masks: dict[tuple, torch.Tensor | None] = {}  # (B, 1, T, S) additive in dtype, or None: causal
        for w, g in {self._key(i) for i in range(config.num_hidden_layers)}:
            if isinstance(g, tuple):
                n = g[1]
                pos = ring_positions(torch.arange(min(S, n), device=device)[None, None, :], n, after)
                a = (pos >= 0) & (pos <= qpos) & (qpos - pos < w)
            else:
                a = key <= qslot
                if w is not None:
                    a = a & (qpos - (key if g is None else policy.states[g].pos[:, None, :S]) < w)
            self.allowed[w, g] = a
            self.masks[w, g] = None if fresh and (w is None or w >= T) else (
                torch.zeros(a.shape, dtype=dtype, device=device).masked_fill(~a, fill)[:, None]
            )

    def _key(self, i: int) -> tuple:
        """Layer i's mask: (window, what its slots depend on)."""
        w, g = self.config.layer_windows[i], self.group_of[i]
        if self.cache.is_ring(g):
            return (w, ("ring", self.cache.slots[g]))
        return (w, g if self.policy is not None and w is not None else None)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i's (allowed (B, T, S) bool, additive mask (B, 1, T, S) or None where plain causal attention is
        exact)."""
        key = self._key(i)
        return self.allowed[key], self.masks[key]


def absorbed_prompt_attention(proj: AbsorbedProjections, i: int, x, cos, sin, latent, k_rope, mask,
                              key_scale=None) -> torch.Tensor:
    """Layer i's attention for T new tokens as decode computes it, batched: every head against the group's
    latent (keys [latent | rope keys], values the latent), then the absorbed output projection. x (B, T, hidden),
    cos/sin (B, Hr, T, Dr), latent (B, S, R), k_rope (B, Hr, S, Dr), mask (B, 1, T, S) additive or None
    (causal, S == T), key_scale (B, S, K) or None -> (B, T, hidden)."""
    B, T, _ = x.shape
    H, K, Hr, Dr, _ = proj.dims
    S, R = latent.shape[1:]
    c_, s_ = (t.transpose(1, 2).reshape(B * T, Hr, 1, -1) for t in (cos, sin))
    q_lat, q_rope, head_bias = proj.queries(i, x.reshape(B * T, -1), c_, s_)
    qs, ks = [], []
    if q_lat is not None:
        qs.append(q_lat.view(B, T, H, R))
        ks.append(latent)
    if q_rope is not None:
        qs.append(q_rope.view(B, T, H, Hr * Dr))
        ks.append(k_rope.transpose(1, 2).reshape(B, S, Hr * Dr))
    if head_bias is not None:  # (q·k + bias) r = [q, bias] · [k r, r]: one more dim, a column of ones
        qs.append(head_bias.to(latent.dtype).view(B, T, H, 1))
        ks.append(latent.new_ones(B, S, 1))
    q = torch.cat(qs, -1).transpose(1, 2)  # (B, H, T, E)
    k = torch.cat(ks, -1)[:, None]  # (B, 1, S, E): one stream for every head
    v = latent[:, None]
    E = q.shape[-1]
    if R < E:  # one head dim for the fused kernel (zero dims change nothing; padded value dims are cut off)
        v = F.pad(v, (0, E - R))
    elif E < R:
        q, k = F.pad(q, (0, R - E)), F.pad(k, (0, R - E))
    if key_scale is None:
        k = k.expand(B, H, S, -1)
    else:  # key norms: one key stream per kv head
        k = (k * key_scale.transpose(1, 2)[..., None].to(k.dtype)).repeat_interleave(H // K, dim=1)
    out = F.scaled_dot_product_attention(q, k, v.expand(B, H, S, -1), attn_mask=mask,
                                         is_causal=mask is None, scale=proj.softmax_scale)[..., :R]
    return proj.output(i, out.transpose(1, 2).reshape(B * T, H, R)).view(B, T, -1)


def prompt_attention_seen(proj: AbsorbedProjections, policy, i: int, x, cos, sin, latent, k_rope, allowed,
                          n_new: list[int], log_weights, key_scale=None, strongest: bool = False) -> torch.Tensor:
    """What a score-based policy learns from a prompt: the attention each slot receives from the prompt's last
    `policy.prefill_queries` queries of layer i, summed over heads, query t of row b weighted
    decay^(n_b - 1 - t) (padding queries weigh nothing); with `strongest`, from every query of the step, the most
    any query gives it in any head. x (B, T, hidden), cos/sin (B, Hr, T, Dr), latent (B, S, R),
    k_rope (B, Hr, S, Dr), allowed (B, T, S) bool, log_weights (B, ≥ S) fp32 (merged slots), key_scale (B, S, K)
    or None -> (B, S) fp32."""
    B, T, _ = x.shape
    H, K, Hr, Dr, _ = proj.dims
    R = latent.shape[-1]
    Qn = T if strongest else min(T, policy.prefill_queries)
    xs = x[:, T - Qn :].reshape(B * Qn, -1)
    c_, s_ = (t[:, :, T - Qn :].transpose(1, 2).reshape(B * Qn, Hr, 1, -1) for t in (cos, sin))
    q_lat, q_rope, head_bias = proj.queries(i, xs, c_, s_)
    S = latent.shape[1]
    scores = torch.zeros(B, Qn, H, S, device=x.device)
    if q_lat is not None:
        scores += torch.matmul(q_lat.view(B, Qn * H, R).float(), latent.float().transpose(1, 2)).view(B, Qn, H, S)
    if q_rope is not None:
        keys = k_rope.transpose(1, 2).reshape(B, S, -1).float()
        scores += torch.matmul(q_rope.view(B, Qn * H, -1).float(), keys.transpose(1, 2)).view(B, Qn, H, S)
    if head_bias is not None:
        scores += head_bias.view(B, Qn, H, 1)
    if key_scale is not None:
        scores = scores * key_scale.float().repeat_interleave(H // K, dim=2).transpose(1, 2)[:, None]
    scores = scores * proj.softmax_scale + log_weights[:, None, None, :S]
    scores = scores.masked_fill(~allowed[:, T - Qn :, None, :], float("-inf"))
    t = torch.arange(T - Qn, T, device=x.device)[None, :]
    n = torch.tensor(n_new, device=x.device)[:, None]
    if strongest:
        return scores.softmax(-1).masked_fill(~(t < n)[:, :, None, None], 0.0).amax((1, 2))
    weight = torch.where(t < n, policy.decay ** (n - 1 - t).clamp_min(0).float(), 0.0)  # (B, Qn)
    return (scores.softmax(-1).sum(2) * weight[:, :, None]).sum(1)
