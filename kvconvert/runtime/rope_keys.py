"""Rope keys from the latent (config.rope_from_latent): nothing but the latent is cached, and each layer makes its
rope keys from the dequantized latent, RoPE(W_ur c_s) at the position slot s holds.

Prefill runs the model's own code (CllaAttention.rope_keys) with the slots' rotations as [cos | sin]
(`slot_rotations`). Decode takes W_ur's rows in frequency-pair order ((j, j + Dr/2) of each rope head -> (2j, 2j +
1)), which makes the keys complex numbers rotated by one complex product. On the reference path (CPU) the keys of
every layer of a group are made once per step from the group's dequantized latent: one matmul, then one complex
product with the slots' rotations, shared by the groups whose slots hold the same positions. On the Triton path the
decode kernel rebuilds and rotates them itself from the latent tile it has loaded (`kernels.RopeUp`): nothing the
size of the cache is written. The queries' rope dims take the same pair order and rotate by a complex product too
(scores are sums over dims: the order does not change them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache_layout import Stream, ring_positions
from ..kernels import RopeUp, uses_triton
from ..model import rope_cos_sin
from .cache import LatentCache


def pair_order(dim: int, device) -> torch.Tensor:
    """The permutation (dim,) of one rope head's dims that puts each frequency pair (j, j + dim/2) side by side."""
    j = torch.arange(dim // 2, device=device)
    return torch.stack([j, j + dim // 2], -1).view(dim)


def rotate(k: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rope keys or queries in pair order (..., n, W) real, times `rotations` (..., W/2) complex broadcast over n
    -> (..., n, W) fp32."""
    *lead, n, W = k.shape
    z = torch.view_as_complex(k.float().reshape(*lead, n, W // 2, 2)) * rotations.unsqueeze(-2)
    return torch.view_as_real(z).view(*lead, n, W)


class RopeFromLatent:
    """Rope keys from the latent for one runtime: its layers' rope_up rows in pair order, the slots' and the
    queries' rotations, and the rotated keys of a decode step."""

    @torch.no_grad()
    def __init__(self, model, cache: LatentCache, policy, inv_freq: torch.Tensor, dtype: torch.dtype):
        """inv_freq: (NG, Hr · Dr/2) the rope frequencies of every layer group (rope_inv_freq); dtype: the model's."""
        self.config = cfg = model.config
        self.cache, self.policy, self.inv_freq, self.dtype = cache, policy, inv_freq, dtype
        self.device = device = inv_freq.device
        self.attention = [layer.self_attn for layer in model.model.layers]
        Hr, Dr = cfg.rope_heads, cfg.rope_dim
        self.head_perm = pair_order(Dr, device)  # within one rope head
        perm = (self.head_perm.view(1, Dr) + Dr * torch.arange(Hr, device=device)[:, None]).view(-1)
        # Per group, its layers' reordered rope_up stacked (n · Hr · Dr, R): on the reference path one matmul and one
        # complex product make every layer's rope keys of a step; each layer's own weights are views of it.
        W = Hr * Dr
        self.group_weights, self.layer_weights = [], [None] * cfg.num_hidden_layers
        for group in cfg.layer_groups:
            ups = [self.attention[i].rope_up for i in group]
            w = torch.cat([up.weight[perm] for up in ups])
            b = None if ups[0].bias is None else torch.cat([up.bias[perm] for up in ups])
            self.group_weights.append((w, b))
            for n, i in enumerate(group):
                self.layer_weights[i] = (w[n * W : (n + 1) * W], None if b is None else b[n * W : (n + 1) * W])
        self.index_in_group = [group.index(i) for group in cfg.layer_groups for i in group]
        self.freq = inv_freq.reshape(cfg.num_layer_groups, Hr * (Dr // 2))  # (NG, Hr · Dr/2), pair order
        # Groups whose slots hold the same positions and whose frequencies are equal share one step's rotations
        # (without a policy or a ring: every group, computed once per step)
        freqs = [tuple(f.tolist()) for f in self.freq]
        self.rotation_key = [(freqs.index(freqs[g]), g if policy is not None else None,
                              cache.slots[g] if cache.is_ring(g) else None) for g in range(cfg.num_layer_groups)]

    def weights(self) -> list[torch.Tensor]:
        """The reordered rope_up weights and biases this holds beside the model's (copies)."""
        return [t for pair in self.group_weights for t in pair if t is not None]

    def slot_positions(self, g: int, S: int, lens: torch.Tensor) -> torch.Tensor:
        """The position (B, S) each of group g's first S slots holds: slot s holds position s, or in a ring of n slots
        (lens[b] tokens written, padding included), the last position p < lens[b] with p % n == s (never-written
        slots get negative positions: masked anyway), or under a policy the slot's rotation position
        (GroupState.rot)."""
        if self.policy is not None:
            return self.policy.states[g].rot[:, :S]
        slot = torch.arange(S, device=self.device)[None, :]
        pos = ring_positions(slot, self.cache.slots[g], lens.long()[:, None]) if self.cache.is_ring(g) else slot
        return pos.expand(self.cache.batch, S)

    def slot_rotations(self, g: int, S: int, lens: torch.Tensor) -> torch.Tensor:
        """Prefill: [cos | sin] (B, Hr, S, 2 Dr) of group g's first S slots (`slot_positions`), as
        CllaAttention.rope_keys takes them."""
        cos, sin = rope_cos_sin(self.config, self.slot_positions(g, S, lens), self.dtype, self.inv_freq[g : g + 1])
        return torch.cat([cos[0], sin[0]], -1)

    def layer_keys(self, i: int, latent: torch.Tensor, slot_rotations: torch.Tensor) -> torch.Tensor:
        """Prefill: layer i's rope keys (B, Hr, S, Dr) from the latent (B, S, R), by the model's own code."""
        return self.attention[i].rope_keys(latent, slot_rotations)

    def decode_keys(self, g: int, streams, lens: torch.Tensor, rotations: dict) -> torch.Tensor | None:
        """Decode, reference path: every layer of group g's rope keys at once, (B, S, n_layers, Hr · Dr) fp32 in
        pair order (one matmul for the group, one complex product with the slots' rotations e^(i p θ) · attention
        scaling, kept in `rotations`, this step's, by rotation_key). streams: the group's (latent, rope, tail) as
        decode_streams gives them (the latent dequantized, its tail joined). None on the Triton path: the kernel
        rebuilds them (`layer_keys_for_decode`)."""
        latent = streams[0]
        if uses_triton(latent.data):
            return None
        plain = latent.data.to(self.dtype)
        B, S, _ = plain.shape
        key = (self.rotation_key[g], S)
        if key not in rotations:
            angle = self.slot_positions(g, S, lens).float()[..., None] * self.freq[g]
            rotations[key] = torch.polar(torch.full_like(angle, self.config.rope_attention_scaling), angle)
        w, b = self.group_weights[g]
        return rotate(F.linear(plain, w, b).view(B, S, len(self.config.layer_groups[g]), -1), rotations[key])

    def layer_keys_for_decode(self, i: int, g: int, keys: torch.Tensor | None) -> tuple[Stream | None, RopeUp | None]:
        """Decode: layer i's rope keys as the kernels take them: (rope stream, None) on the reference path (its slice
        of the group's `decode_keys`, fp32), (None, RopeUp) on the Triton path (the kernel rebuilds the keys from
        the latent tile and rotates them at each slot's position: the slot's own, or a policy's rotation position)."""
        if keys is not None:
            return Stream(keys[:, :, self.index_in_group[i]], None, 16, 1, keys.shape[-1]), None
        w, b = self.layer_weights[i]
        positions = self.policy.states[g].rot if self.policy is not None else None
        return None, RopeUp(w, b, self.freq[g], self.config.rope_attention_scaling, positions)

    def query_rotations(self, g: int, positions: torch.Tensor, rotations: dict) -> torch.Tensor:
        """Decode: e^(i p θ) · attention scaling at each row's position (B,) over group g's frequencies,
        (B, Hr, Dr/2) complex64 (cached in `rotations` like the slots' rotations)."""
        key = ("query", self.rotation_key[g][0])
        if key not in rotations:
            angle = positions.float()[:, None] * self.freq[g]
            rot = torch.polar(torch.full_like(angle, self.config.rope_attention_scaling), angle)
            rotations[key] = rot.view(-1, self.config.rope_heads, self.config.rope_dim // 2)
        return rotations[key]

    def rotate_queries(self, q: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Decode: rope queries (N, Hr, n, Dr) in the model's order -> rotated, in pair order, (N, Hr, n, Dr) fp32;
        rotations (N, Hr, Dr/2) complex (`query_rotations`)."""
        return rotate(q[..., self.head_perm], rotations)
