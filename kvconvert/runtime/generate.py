"""The CLLA runtime: prefill into a LatentCache, then absorbed decode over the quantized latent.

Prefill (T new tokens per row, rows right-padded): each group's first layer quantizes its latent and rope keys
into the cache (kernels.quantize_append); attention reads the group's cache back (dequantized), reconstructs keys
and values with the layer's own up-projections and runs SDPA: the model's own attention code, so prefill is
exactly what the model computes.

Decode (one token per row): the up-projections are absorbed (DESIGN.md, "The model"):
  q_lat[h] = W_uk[kv(h)]ᵀ q_nope[h]              (B, H, R)
  o_lat[h] = Σ_s softmax_s(q_lat·c_s + q_rope·k_rope_s) c_s   kernels.latent_decode: MQA over one latent stream
  v[h]     = W_uv[kv(h)] o_lat[h] + b_v          (a value bias passes through: the weights sum to 1)
A key bias adds q_nope·b_k to every score of a head: constant over positions, it cancels in the softmax.
A qk-norm source (Qwen3, Gemma 3): every layer caches its key norms r (B, S, K), which multiply kv head k's scores
(kernels' key_scale); queries are normed per head then mapped by q_map, with W_uk folded into that map.
With rope keys from the latent (config.rope_from_latent) nothing else is cached: each layer reconstructs its rope
keys from the dequantized latent, RoPE(W_ur c_s) at slot s's position, and the kernels read them as a 16-bit rope
stream (materialized every step: one matmul with W_ur's rows in frequency-pair order, then one complex product
with the step's rotations, shared by the groups whose slots hold the same positions; on the reference path one
matmul serves all the layers of a group, on the Triton path one layer at a time bounds the transient. The queries'
rope dims take the same order and rotate by a complex product too. A kernel that rotates them in registers is not
written).
On CPU the runtime re-lays out the model's wide Linear weights for matrix-vector products (layout.py), and every
step runs under inference_mode: batch-1 CPU decode is bound by weight streaming and per-op overhead.
The decode step has no host synchronisation and fixed shapes, so on CUDA it is captured once in a CUDA graph and
replayed; on CPU the same code runs on the PyTorch references.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RING_CHUNK, group_window
from ..errors import KvconvertError
from ..kernels import (Stream, decode_streams, dequantize_stream, dequantize_streams, latent_attention_weights,
                       latent_decode, quantize_append, quantize_append_streams, uses_triton)
from ..model import CllaForCausalLM, apply_rope, rope_cos_sin, rope_inv_freq
from .cache import LatentCache
from .layout import gemv_layout, gemv_layout_


def ring_positions(slot: torch.Tensor, n: int, after: torch.Tensor) -> torch.Tensor:
    """The token position slot s of a ring of n slots holds: the last p < after with p % n == s (negative where
    nothing was written yet). Broadcasts slot against after (one past the last position written, per row)."""
    return slot + n * torch.div(after - 1 - slot, n, rounding_mode="floor")


@dataclass
class SamplingOptions:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; stop tokens end a row (not included in its output)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise KvconvertError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise KvconvertError("--temperature must be >= 0")
        if self.top_k < 0:
            raise KvconvertError("--top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise KvconvertError("--top-p must be in (0, 1]")


def sample(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) int64."""
    if opts.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / opts.temperature
    if opts.top_k and opts.top_k < logits.shape[-1]:
        kth = logits.topk(opts.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > opts.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0

    batch: int = 1

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (the first new token of each row comes from the prefill)."""
        return self.steps * self.batch / self.decode_s if self.decode_s else 0.0


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


def absorb_layer(attn, cfg, window: int | None) -> AbsorbedLayer:
    """Fold the up-projections of one CllaAttention into its query and output projections where that saves bytes
    (exact up to float rounding: folded in fp32, stored in the model's dtype). What is not folded stays a view of
    the model's own weights: the runtime holds no second copy of them."""
    H, K, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    Dn, Dr, Dv, R = cfg.qk_nope_dim, cfg.rope_dim, cfg.head_dim, cfg.kv_latent_dim
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


class LatentRuntime:
    """Runs a CllaForCausalLM over a LatentCache of `batch` rows × `capacity` positions."""

    def __init__(
        self,
        model: CllaForCausalLM,
        batch: int,
        capacity: int,
        cuda_graphs: bool | None = None,
        policy=None,
        context: int | None = None,
        ring_chunk: int | None = RING_CHUNK,
        cpu_layout: bool | None = None,
    ):
        """policy: a token-budget cache policy (runtime/policies) whose budget is a share of `context` (the longest
        conversation in tokens; default: the capacity); the cache then needs budget + one prefill chunk of slots.
        ring_chunk: sliding-window layer groups keep a ring of window + ring_chunk - 1 slots, and a prefill step
        takes at most ring_chunk tokens (None, or under a policy: every group keeps every token).
        cpu_layout: on CPU, re-lay out the model's wide Linear weights in place for matrix-vector products (the
        same values and shapes, input-major storage: runtime/layout.py); default: for a batch of one row, where it
        pays (bench/gemv_layout.py: about 1.7x on those weights at one row, 0.9-1.0x at four)."""
        self.model = model.eval()
        self.config = cfg = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cpu_layout = (batch == 1 if cpu_layout is None else cpu_layout) and self.device.type == "cpu"
        if self.cpu_layout:
            gemv_layout_(model)
        longest = context or capacity  # with a policy, slots are reused: the context bounds the positions
        if longest > cfg.max_position_embeddings:
            raise KvconvertError(
                f"context {longest:,} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings:,})"
            )
        dtype16 = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else torch.float16
        if policy is not None or not any(w is not None for w in cfg.layer_windows):
            ring_chunk = None
        if ring_chunk is not None and ring_chunk < 1:
            raise ValueError(f"ring_chunk must be at least 1, got {ring_chunk}")
        self.cache = LatentCache(cfg, batch, capacity, self.device, dtype16, ring_chunk)
        self.dtype16 = dtype16
        self.ring_chunk = ring_chunk if any(self.cache.is_ring(g) for g in range(cfg.num_layer_groups)) else None
        self.lengths = [0] * batch  # host copy of cache.seq_lens: capacity checks without a device sync
        # Token positions (RoPE) per row: equal to the slot counts unless a policy evicts or merges slots.
        self.positions = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.seen = [0] * batch
        self.written = [0] * batch  # per row, one past the furthest token written (a prefill's padding included)
        self.context = context or capacity
        self.policy = policy
        if policy is not None:
            slots = policy.slots(self.context)
            if capacity <= slots:
                raise KvconvertError(f"a cache of {capacity:,} slots leaves no room past the {slots:,}-slot budget")
            policy.setup(cfg.num_layer_groups, batch, capacity, slots, self.device)
            cuda_graphs = False  # the policy's bookkeeping runs on the host between steps
        H, Hr, Dr = cfg.num_attention_heads, cfg.rope_heads, cfg.rope_dim
        self.dims = (H, cfg.num_key_value_heads, Hr, Dr, cfg.kv_latent_dim, cfg.head_dim)
        self.softmax_scale = cfg.softmax_scale
        self.group_of = cfg.group_of_layer()
        self.first_of_group = {g[0] for g in cfg.layer_groups}
        # Prompt attention absorbed too (MQA over the latent, as decode) where its head dims are narrower than the
        # reconstructed keys and values: scores over R + Hr·Dr dims and values over R, against Dn + Dr and Dv
        # (each pair padded to one width for the fused SDPA kernel). Narrow latents win (SmolLM2 at 2%: 64 vs 96);
        # wide ones and the identity plan keep the model's own attention.
        absorbed = max((cfg.kv_latent_dim if cfg.qk_nope_dim else 0) + Hr * Dr, cfg.kv_latent_dim)
        self.absorbed_prefill = absorbed < max(cfg.qk_nope_dim + Dr, cfg.head_dim)
        with torch.no_grad():
            self.layers = [absorb_layer(layer.self_attn, cfg, cfg.layer_windows[i]) for i, layer in enumerate(model.model.layers)]
            if self.cpu_layout:  # the folded copies too (views of the model's weights follow its layout)
                for lay in self.layers:
                    lay.q_weight = gemv_layout(lay.q_weight)
                    lay.o_weight = None if lay.o_weight is None else gemv_layout(lay.o_weight)
            self.inv_freq = rope_inv_freq(cfg, self.device)
            # Query head h scores against rope head h // (H / Hr): its rope query is laid over the whole rope
            # stream (Hr * Dr values) and zero outside its own head, so one MQA kernel serves every rope layout.
            per = H // Hr if Dr else 1
            mask = torch.zeros(H, Hr * Dr, dtype=self.dtype, device=self.device)
            for h in range(H):
                r = h // per
                mask[h, r * Dr : (r + 1) * Dr] = 1
            self.rope_head_mask = mask
            if cfg.rope_from_latent:
                self._init_rebuilt_rope_keys()
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and self.device.type != "cuda":
            raise KvconvertError("CUDA graphs need a CUDA device")
        self.use_graphs = use_graphs
        self._graph = None

    def _init_rebuilt_rope_keys(self) -> None:
        """rope_from_latent, decode: each layer's rope_up with its output dims reordered so that every frequency
        pair is adjacent ((j, j + Dr/2) of each rope head -> (2j, 2j + 1)): its rope keys are then complex numbers
        that one complex product per step rotates. The queries' rope dims take the same order (rope_perm); scores
        are sums over dims, so they do not change."""
        cfg = self.config
        Hr, Dr = cfg.rope_heads, cfg.rope_dim
        half = Dr // 2
        j = torch.arange(half, device=self.device)
        self.rope_head_perm = torch.stack([j, j + half], -1).view(Dr)  # within one rope head
        heads = Dr * torch.arange(Hr, device=self.device)[:, None]
        self.rope_perm = (self.rope_head_perm.view(1, Dr) + heads).view(-1)
        # Per group, its layers' reordered rope_up stacked (n · Hr · Dr, R): on the reference path one matmul and one
        # complex product rebuild every layer's rope keys of a step; each layer's own weights are views of it.
        W = Hr * Dr
        self.rope_w_group, self.rope_w = [], [None] * cfg.num_hidden_layers
        for group in cfg.layer_groups:
            ups = [self.model.model.layers[i].self_attn.rope_up for i in group]
            w = torch.cat([up.weight[self.rope_perm] for up in ups])
            b = None if ups[0].bias is None else torch.cat([up.bias[self.rope_perm] for up in ups])
            self.rope_w_group.append((w, b))
            for n, i in enumerate(group):
                self.rope_w[i] = (w[n * W : (n + 1) * W], None if b is None else b[n * W : (n + 1) * W])
        self.index_in_group = [group.index(i) for group in cfg.layer_groups for i in group]
        self.rope_freq = self.inv_freq.reshape(cfg.num_layer_groups, Hr * half)  # (NG, Hr · Dr/2), pair order
        # Groups whose slots hold the same positions and whose frequencies are equal share one step's rotations
        # (without a policy or a ring: every group, computed once per step)
        freqs = [tuple(f.tolist()) for f in self.rope_freq]
        self.rotation_key = [(freqs.index(freqs[g]), g if self.policy is not None else None,
                              self.cache.slots[g] if self.cache.is_ring(g) else None) for g in range(cfg.num_layer_groups)]

    def extra_weight_bytes(self) -> int:
        """Bytes of the folded weights the runtime holds beside the model's own (views of the model excluded)."""
        own = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen: set[int] = set()
        total = 0
        folded = [t for lay in self.layers for t in (lay.q_weight, lay.q_bias, lay.w_uk, lay.o_weight, lay.o_bias,
                                                      lay.w_uv_t, lay.b_uv, lay.q_map, lay.key_bias_q)]
        rebuilt = [t for pair in getattr(self, "rope_w_group", []) for t in pair]  # rope_from_latent's rope_up
        for t in folded + rebuilt:
            if t is not None and (ptr := t.untyped_storage().data_ptr()) not in own | seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    # ------------------------------------------------------------------ state
    @torch.inference_mode()
    def reset(self) -> None:
        self.cache.reset()
        self.lengths = [0] * self.cache.batch
        self.positions.zero_()
        self.seen = [0] * self.cache.batch
        self.written = [0] * self.cache.batch
        if self.policy is not None:
            self.policy.reset()

    def log_weights(self, g: int) -> torch.Tensor | None:
        return None if self.policy is None else self.policy.states[g].log_weights()

    @torch.inference_mode()
    def truncate(self, length: int) -> None:
        """Keep only the first `length` tokens of every row (what is past them is never read again). Under a cache
        policy the slots are not a prefix of the tokens, and a ring may have overwritten the window before
        `length` (with any token written since, a padded row's padding too): then anything shorter than what was
        seen starts over (`seen` says where a caller stands)."""
        if all(n == length for n in self.seen):
            return
        if self.policy is not None or any(
            self.cache.is_ring(g) and max(self.written) - length > self.cache.slots[g] - group_window(self.config, g)
            for g in range(self.config.num_layer_groups)
        ):
            self.reset()  # slots no longer hold the tokens before `length`: start over
            return
        if length > min(self.lengths):
            raise ValueError(f"cannot truncate to {length}: a row holds only {min(self.lengths)} tokens")
        self.cache.seq_lens.fill_(length)
        self.positions.fill_(length)
        self.lengths = [length] * self.cache.batch
        self.seen = [length] * self.cache.batch  # `written` stays: tokens past `length` still sit in their slots

    def _check_room(self, new: list[int]) -> None:
        """Rows about to take new[b] more tokens: within the context, and (without a policy) within the cache."""
        for b, n in enumerate(new):
            if self.seen[b] + n > self.context:
                raise KvconvertError(
                    f"context full: row {b} would reach {self.seen[b] + n:,} tokens, more than the {self.context:,} "
                    "allowed (start over, or raise the context)"
                )
        if self.policy is None:
            self._check_slots(max(new))

    def _check_slots(self, T: int) -> None:
        """T new slots per row must fit the cache now (a policy frees slots only after a step)."""
        for b, n in enumerate(self.lengths):
            if n + T > self.cache.capacity:
                raise KvconvertError(
                    f"context full: row {b} would hold {n + T:,} tokens, the cache holds "
                    f"{self.cache.capacity:,} (start over, or raise the context)"
                )

    # ------------------------------------------------------------------ attention paths
    def _append(self, g: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: torch.Tensor) -> None:
        """Quantize group g's latent and rope keys of x (B, T, hidden) into the cache at start[b] + t."""
        proj = self.model.model.latent_proj[g]
        B, T, _ = x.shape
        quantize_append_streams(self.cache.latent_streams(g), proj.latent(x), start)  # the head, then any tail
        if proj.rope_proj is not None:
            k_rope = proj.rope_keys(x).transpose(1, 2)
            k_rope = apply_rope(k_rope, cos, sin).transpose(1, 2).reshape(B, T, -1)
            quantize_append(self.cache.rope(g), k_rope, start)

    def _append_key_scale(self, i: int, x: torch.Tensor, start: torch.Tensor) -> None:
        """A qk-norm source's layer i: its key norms of x (B, T, hidden) into the cache at start[b] + t."""
        k_scale = self.model.model.layers[i].self_attn.k_scale
        if k_scale is not None:
            quantize_append(self.cache.key_scale(i), k_scale(x), start)

    def _key_scale(self, i: int, S: int | None = None) -> torch.Tensor | None:
        """Layer i's key norms of the first S slots (all of them: None; S covers a ring's), (B, S, K), or None."""
        ks = self.cache.key_scale(i)
        return None if ks is None else ks.data[:, :S]

    def _slot_positions(self, g: int, S: int, lens: torch.Tensor) -> torch.Tensor:
        """rope_from_latent: the position (B, S) each of group g's first S slots holds: slot s holds position s, or
        in a ring of n slots (lens[b] tokens written, padding included), the last position p < lens[b] with
        p % n == s (never-written slots get negative positions: masked anyway), or under a policy the slot's
        rotation position (GroupState.rot)."""
        if self.policy is not None:
            return self.policy.states[g].rot[:, :S]
        slot = torch.arange(S, device=self.device)[None, :]
        pos = ring_positions(slot, self.cache.slots[g], lens.long()[:, None]) if self.cache.is_ring(g) else slot
        return pos.expand(self.cache.batch, S)

    def _slot_rotations(self, g: int, S: int, lens: torch.Tensor) -> torch.Tensor:
        """rope_from_latent: [cos | sin] (B, Hr, S, 2 Dr) of group g's first S slots (_slot_positions), as
        CllaAttention.rope_keys takes them."""
        cos, sin = rope_cos_sin(self.config, self._slot_positions(g, S, lens), self.dtype, self.inv_freq[g : g + 1])
        return torch.cat([cos[0], sin[0]], -1)

    def _layer_rope(self, i: int, latent: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Layer i's rope keys (B, Hr, S, Dr): the group's cached ones, or (rope_from_latent, `rope` then being the
        slots' rotations) reconstructed from the latent (B, S, R)."""
        if not self.config.rope_from_latent:
            return rope
        return self.model.model.layers[i].self_attn.rope_keys(latent, rope)

    @staticmethod
    def _rotate(k: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        """Rope keys or queries in pair order (..., n, W) real, times `rotations` (..., W/2) complex broadcast over
        n -> (..., n, W) fp32."""
        *lead, n, W = k.shape
        z = torch.view_as_complex(k.float().reshape(*lead, n, W // 2, 2)) * rotations.unsqueeze(-2)
        return torch.view_as_real(z).view(*lead, n, W)

    def _rope_stream(self, i: int, latent: torch.Tensor, rotations: torch.Tensor) -> Stream:
        """Decode, rope_from_latent, Triton path: layer i's rope keys over the slots of `latent` (B, S, R) (the
        plain latent of `_decode_latent`), rotated by `rotations` (B, S, Hr · Dr/2) complex, as a 16-bit stream the
        kernels read, (B, S, Hr · Dr) in pair order (`_init_rebuilt_rope_keys`). One layer at a time: the transient
        is one layer's keys."""
        w, b = self.rope_w[i]
        k = self._rotate(F.linear(latent, w, b)[..., None, :], rotations)[..., 0, :]
        return Stream(k.to(self.dtype16), None, 16, 1, k.shape[-1])

    def _decode_latent(self, g: int, streams, lens: torch.Tensor, rotations: dict):
        """rope_from_latent: the dequantized latent (B, S, R) of group g every layer rebuilds its rope keys from,
        over the slots the kernels read, and those slots' rotations e^(i p θ) · attention scaling, (B, S, Hr · Dr/2)
        complex64 (`rotations`: this step's, by rotation_key), and on the reference path every layer's rebuilt
        rope keys at once, (B, S, n_layers, Hr · Dr) fp32 (one matmul for the group), else None (per layer, later)."""
        latent, _, tail = streams
        triton = uses_triton(latent.data)
        if not triton:  # decode_streams already made it plain (the tail joined)
            plain = latent.data.to(self.dtype)
        else:  # Triton reads the cache itself: dequantize every slot (fixed shapes for CUDA graphs)
            S = latent.data.shape[1]
            plain = dequantize_streams([s for s in (latent, tail) if s is not None], S, self.dtype)
        key = (self.rotation_key[g], plain.shape[1])
        if key not in rotations:
            angle = self._slot_positions(g, plain.shape[1], lens).float()[..., None] * self.rope_freq[g]
            rotations[key] = torch.polar(torch.full_like(angle, self.config.rope_attention_scaling), angle)
        keys = None
        if not triton:
            w, b = self.rope_w_group[g]
            B, S, _ = plain.shape
            keys = self._rotate(F.linear(plain, w, b).view(B, S, len(self.config.layer_groups[g]), -1), rotations[key])
        return plain, rotations[key], keys

    def _query_rotations(self, g: int, rotations: dict) -> torch.Tensor:
        """rope_from_latent, decode: e^(i p θ) · attention scaling at each row's position over group g's
        frequencies, (B, Hr, Dr/2) complex64 (shared like the slots' rotations)."""
        key = ("query", self.rotation_key[g][0])
        if key not in rotations:
            angle = self.positions.float()[:, None] * self.rope_freq[g]
            rot = torch.polar(torch.full_like(angle, self.config.rope_attention_scaling), angle)
            rotations[key] = rot.view(-1, self.config.rope_heads, self.config.rope_dim // 2)
        return rotations[key]

    def _read_group(self, g: int, S: int, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first S slots of group g as the model's attention takes them: latent (B, S, R), rope (B, Hr, S, Dr)
        (rope_from_latent: the slots' rotations, see CllaLatentProjection.forward; `after`: per row, one past the last
        slot written, which places a ring's slots)."""
        cfg = self.config
        latent = dequantize_streams(self.cache.latent_streams(g), S, self.dtype)
        if cfg.rope_from_latent:
            return latent, self._slot_rotations(g, S, after)
        rope = self.cache.rope(g)
        B = latent.shape[0]
        if rope is None:
            return latent, latent.new_zeros(B, 1, S, 0)
        k_rope = dequantize_stream(rope, S, self.dtype).view(B, S, cfg.rope_heads, cfg.rope_dim).transpose(1, 2)
        return latent, k_rope

    def _queries(self, lay: AbsorbedLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rotations: torch.Tensor | None = None):
        """Absorbed queries of N tokens: x (N, hidden), cos/sin (N, Hr, 1, Dr) -> q_lat (N, H, R) or None,
        q_rope (N, H, Hr * Dr) or None (laid over the whole rope stream, zero outside the head's rope head), and the
        per-head score term of a key bias under key norms (N, H) fp32, or None. With `rotations` (N, Hr, Dr/2)
        complex instead of cos/sin (decode of rebuilt rope keys), the rope dims come in pair order, rotated by them."""
        N = x.shape[0]
        H, K, Hr, Dr, R, _ = self.dims
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
                q_lat = torch.matmul(q_lat.reshape(N, K, H // K, Q), lay.w_uk).view(N, H, R)
        q_rope = None
        if Dr and rotations is not None:
            q_rope = self._rotate(q[..., Q:].reshape(N, Hr, H // Hr, Dr)[..., self.rope_head_perm], rotations)
            q_rope = q_rope.view(N, H, Dr)
        elif Dr:
            q_rope = apply_rope(q[..., Q:].reshape(N, Hr, H // Hr, Dr), cos, sin).view(N, H, Dr)
        if Dr and Hr > 1:
            q_rope = torch.cat([q_rope] * Hr, -1) * self.rope_head_mask  # (cat: 3x faster than repeat on CPU)
        return q_lat, q_rope, head_bias

    def _decode_attention(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lens: torch.Tensor, streams):
        """Absorbed attention of layer i for one token per row: x (B, 1, hidden) -> (B, 1, hidden).
        cos/sin (B, Hr, 1, Dr) at each row's position; streams: the group's (latent, rope, tail) as kernels read them."""
        lay = self.layers[i]
        log_w = self.log_weights(self.group_of[i])
        ks = self._key_scale(i)
        if self.config.rope_from_latent:  # streams: (the latent's kernel streams, _decode_latent's, query rotations)
            (latent, _, tail), (plain, rotations, keys), q_rot = streams
            q_lat, q_rope, head_bias = self._queries(lay, x[:, 0], cos, sin, q_rot)  # rope dims in pair order
            if keys is None:
                rope = self._rope_stream(i, plain, rotations)
            else:  # the reference path rebuilt every layer's keys of the group at once
                rope = Stream(keys[:, :, self.index_in_group[i]], None, 16, 1, keys.shape[-1])
        else:
            q_lat, q_rope, head_bias = self._queries(lay, x[:, 0], cos, sin)
            latent, rope, tail = streams
        o_lat = latent_decode(q_lat, q_rope, latent, rope, lens, self.softmax_scale, lay.window, log_weights=log_w,
                              key_scale=ks, head_bias=head_bias, tail=tail)
        if self.policy is not None and self.policy.scored:
            seen = latent_attention_weights(q_lat, q_rope, latent, rope, lens, self.softmax_scale, lay.window, log_w,
                                            ks, head_bias, tail)
            self._attention_seen[self.group_of[i]][:, : seen.shape[1]] += seen
        return self._attention_output(i, o_lat)[:, None]

    def _attention_output(self, i: int, o_lat: torch.Tensor) -> torch.Tensor:
        """Layer i's output projection of absorbed attention outputs: o_lat (N, H, R) -> (N, hidden), through W_o
        with W_uv folded in, or W_uv (+ the value bias) then the model's o_proj."""
        lay = self.layers[i]
        N = o_lat.shape[0]
        H, K, _, _, R, Dv = self.dims
        if lay.o_weight is not None:
            return F.linear(o_lat.reshape(N, H * R), lay.o_weight, lay.o_bias)
        per_kv = o_lat.view(N, K, H // K, R).transpose(0, 1).reshape(K, -1, R)  # a view when N == 1 (decode)
        v = torch.bmm(per_kv, lay.w_uv_t).view(K, N, H // K, Dv).transpose(0, 1).reshape(N, H * Dv)
        if lay.b_uv is not None:
            v = v + lay.b_uv
        return self.model.model.layers[i].self_attn.o_proj(v)

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, n_new: list[int], all_logits: bool = False) -> torch.Tensor:
        """Append ids (B, T) (row b: its first n_new[b] tokens, the rest padding) after each row's cached tokens;
        returns the logits (B, vocab) at each row's last new token (rows with n_new 0: at padding, ignore them),
        or with all_logits those of every new token (B, T, vocab)."""
        cfg = self.config
        m = self.model.model
        B, T = ids.shape
        if B != self.cache.batch:
            raise ValueError(f"the cache has {self.cache.batch} rows, got {B}")
        if self.ring_chunk is not None and T > self.ring_chunk:
            raise ValueError(f"a prefill step of {T:,} tokens exceeds the rings' {self.ring_chunk:,} (prefill_chunked)")
        self._check_room(n_new)
        self._check_slots(T)
        start = self.cache.seq_lens.clone()  # the first new slot of each row
        positions = self.positions.long()[:, None] + torch.arange(T, device=self.device)[None, :]
        cos, sin = rope_cos_sin(cfg, positions, self.dtype, self.inv_freq)
        S = max(self.lengths[b] + T for b in range(B))
        policy = self.policy
        if policy is not None:
            for g in range(cfg.num_layer_groups):
                policy.appended(g, start, positions)
        # Slot s is visible to new token t of row b iff s <= start[b] + t and, in a window, its token is recent.
        key = torch.arange(S, device=self.device)[None, None, :]
        qslot = start.long()[:, None, None] + torch.arange(T, device=self.device)[None, :, None]
        qpos = positions[:, :, None]
        fresh = all(n == 0 for n in self.lengths)  # right-padded rows from slot 0: plain causal attention
        fill = torch.finfo(self.dtype).min
        allowed, masks = {}, {}

        def mask_key(w: int | None, g: int) -> tuple:
            # With a policy, slots are not positions: a window is judged on each group's slot positions. A ring's
            # slots hold the positions that wrapped onto them. Every other mask is the same for all groups.
            if self.cache.is_ring(g):
                return (w, ("ring", self.cache.slots[g]))
            return (w, g if policy is not None and w is not None else None)

        after = (start.long() + T)[:, None, None]  # every row wrote T slots (padding included)
        for w, g in {mask_key(cfg.layer_windows[i], self.group_of[i]) for i in range(cfg.num_hidden_layers)}:
            if isinstance(g, tuple):
                n = g[1]
                pos = ring_positions(torch.arange(min(S, n), device=self.device)[None, None, :], n, after)
                a = (pos >= 0) & (pos <= qpos) & (qpos - pos < w)
            else:
                a = key <= qslot
                if w is not None:
                    a = a & (qpos - (key if g is None else policy.states[g].pos[:, None, :S]) < w)
            allowed[w, g] = a
            masks[w, g] = None if fresh and (w is None or w >= T) else (
                torch.zeros(a.shape, dtype=self.dtype, device=self.device).masked_fill(~a, fill)[:, None]
            )
        scored = policy is not None and policy.scored
        attention_seen = [torch.zeros(B, S, device=self.device) for _ in range(cfg.num_layer_groups)] if scored else None
        h = m.embed(ids)
        latent = k_rope = None
        for i, layer in enumerate(m.layers):
            g = self.group_of[i]
            x = layer.input_layernorm(h)
            S_g = min(S, self.cache.slots[g])
            if i in self.first_of_group:
                self._append(g, x, cos[g], sin[g], start)
                latent, k_rope = self._read_group(g, S_g, start + T)
            self._append_key_scale(i, x, start)
            key_scale = self._key_scale(i, S_g)
            w_g = mask_key(cfg.layer_windows[i], g)
            mask = masks[w_g]
            if policy is not None and mask is not None:
                mask = mask + self.log_weights(g)[:, None, None, :S].to(self.dtype)  # merged slots: + log(count)
            rope_i = self._layer_rope(i, latent, k_rope) if self.absorbed_prefill or scored else None
            if self.absorbed_prefill:
                attn = self._absorbed_prompt_attention(i, x, cos[g], sin[g], latent, rope_i, mask, key_scale)
            else:
                attn = layer.self_attn(x, latent, k_rope, cos[g], sin[g], mask,
                                       None if key_scale is None else key_scale.transpose(1, 2))
            h = layer.attn_residual(h, attn)
            if scored:
                attention_seen[g] += self._prompt_attention(i, x, cos[g], sin[g], latent, rope_i, allowed[w_g], n_new,
                                                            key_scale)
            h = layer.mlp_residual(h)
        lengths = torch.tensor(n_new, dtype=torch.int32, device=self.device)
        self.cache.seq_lens += lengths
        self.positions += lengths
        self.written = [max(self.written[b], self.lengths[b] + T) for b in range(B)]
        self.lengths = [self.lengths[b] + n_new[b] for b in range(B)]
        self.seen = [self.seen[b] + n_new[b] for b in range(B)]
        if policy is not None:
            self._apply_policy(attention_seen, lengths)
        if all_logits:
            return self.model.lm_head(m.norm(h))
        last = (lengths.long() - 1).clamp_min(0)
        h_last = h[torch.arange(B, device=self.device), last]
        return self.model.lm_head(m.norm(h_last))

    def _absorbed_prompt_attention(self, i, x, cos, sin, latent, k_rope, mask, key_scale=None) -> torch.Tensor:
        """Layer i's attention for T new tokens as decode computes it, batched: every head against the group's
        latent (keys [latent | rope keys], values the latent), then the absorbed output projection. x (B, T, hidden),
        cos/sin (B, Hr, T, Dr), latent (B, S, R), k_rope (B, Hr, S, Dr), mask (B, 1, T, S) additive or None
        (causal, S == T), key_scale (B, S, K) or None -> (B, T, hidden)."""
        B, T, _ = x.shape
        H, K, Hr, Dr, R, _ = self.dims
        S = latent.shape[1]
        lay = self.layers[i]
        c_, s_ = (t.transpose(1, 2).reshape(B * T, Hr, 1, -1) for t in (cos, sin))
        q_lat, q_rope, head_bias = self._queries(lay, x.reshape(B * T, -1), c_, s_)
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
                                             is_causal=mask is None, scale=self.softmax_scale)[..., :R]
        return self._attention_output(i, out.transpose(1, 2).reshape(B * T, H, R)).view(B, T, -1)

    def _prompt_attention(self, i, x, cos, sin, latent, k_rope, allowed, n_new, key_scale=None) -> torch.Tensor:
        """What a score-based policy learns from a prompt: the attention each slot receives from the prompt's last
        `prefill_queries` queries of layer i, summed over heads, query t of row b weighted decay^(n_b - 1 - t)
        (padding queries weigh nothing). (B, S) fp32."""
        B, T, _ = x.shape
        H, K, Hr, Dr, R, _ = self.dims
        Qn = min(T, self.policy.prefill_queries)
        lay = self.layers[i]
        xs = x[:, T - Qn :].reshape(B * Qn, -1)
        c_, s_ = (t[:, :, T - Qn :].transpose(1, 2).reshape(B * Qn, Hr, 1, -1) for t in (cos, sin))
        q_lat, q_rope, head_bias = self._queries(lay, xs, c_, s_)
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
        scores = scores * self.softmax_scale + self.log_weights(self.group_of[i])[:, None, None, :S]
        scores = scores.masked_fill(~allowed[:, T - Qn :, None, :], float("-inf"))
        t = torch.arange(T - Qn, T, device=x.device)[None, :]
        n = torch.tensor(n_new, device=x.device)[:, None]
        weight = torch.where(t < n, self.policy.decay ** (n - 1 - t).clamp_min(0).float(), 0.0)  # (B, Qn)
        return (scores.softmax(-1).sum(2) * weight[:, :, None]).sum(1)

    def _apply_policy(self, attention_seen, steps: torch.Tensor) -> None:
        """After a step: decay and add the attention the slots received, then bring every group to its budget."""
        policy = self.policy
        counts = None
        for g in range(self.config.num_layer_groups):
            if attention_seen is not None:
                policy.observe(g, attention_seen[g], steps)
            new = policy.compress(g, self.cache.group_streams(g), self.lengths, self.seen)
            if counts is not None and new != counts:
                raise RuntimeError(f"groups disagree on slot counts: {counts} vs {new}")
            counts = new
        if counts != self.lengths:
            self.lengths = counts
            self.cache.seq_lens.copy_(torch.tensor(counts, dtype=torch.int32, device=self.device))

    def prefill_chunk_tokens(self, total: int) -> int:
        """Tokens per prefill chunk. On CPU the attention of a chunk holds batch × heads × chunk × context scores:
        keep that under 2^28 values (1 GiB in fp32). CUDA's fused SDPA kernels hold no scores: there a chunk is
        bounded by its activations (2^19 tokens over the batch) and, once the cache is not empty, by its additive
        mask (batch × chunk × context ≤ 2^29 values); a fresh prompt (causal, no mask) then goes in one piece."""
        B = self.cache.batch
        if self.device.type == "cuda":
            by_tokens = (1 << 19) // B
            if not any(self.lengths) and total <= by_tokens:
                return by_tokens  # the whole prompt, causal: no mask at all
            return max(64, min(by_tokens, (1 << 29) // (B * max(total, 1))))
        return max(64, (1 << 28) // (B * self.config.num_attention_heads * max(total, 1)))

    @torch.inference_mode()
    def prefill_chunked(self, ids: torch.Tensor, n_new: list[int], chunk: int | None = None) -> torch.Tensor:
        """`prefill` in chunks of positions (bounded memory for long prompts); the same logits (B, vocab)."""
        B, T = ids.shape
        chunk = chunk or self.prefill_chunk_tokens(max(self.lengths) + T)
        if self.policy is not None and not self.policy.held:  # compress after every chunk: budget + one chunk
            chunk = min(chunk, self.cache.capacity - self.policy.n_slots)
        if self.ring_chunk is not None:
            chunk = min(chunk, self.ring_chunk)
        if T <= chunk:
            return self.prefill(ids, n_new)
        self._check_room(n_new)
        logits = None
        for lo in range(0, T, chunk):
            part = [min(max(n - lo, 0), chunk) for n in n_new]
            step = self.prefill(ids[:, lo : lo + chunk], part)
            if logits is None:
                logits = step
            ends_here = torch.tensor([lo < n <= lo + chunk for n in n_new], device=self.device)
            logits = torch.where(ends_here[:, None], step, logits)
        return logits

    def _decode_eager(self, ids: torch.Tensor) -> torch.Tensor:
        """One token per row, ids (B,) -> logits (B, vocab); appends at seq_lens and advances it (device-side)."""
        cfg = self.config
        m = self.model.model
        start = self.cache.seq_lens
        lens = start + 1
        if cfg.rope_from_latent:  # queries and keys rotate by complex products instead (_query_rotations)
            cos = sin = [None] * cfg.num_layer_groups
        else:
            cos, sin = rope_cos_sin(cfg, self.positions.long()[:, None], self.dtype, self.inv_freq)  # (NG,B,Hr,1,Dr)
        if self.policy is not None:
            for g in range(cfg.num_layer_groups):
                self.policy.appended(g, start, self.positions.long()[:, None])
            if self.policy.scored:
                self._attention_seen = [torch.zeros(ids.shape[0], self.cache.capacity, device=self.device)
                                        for _ in range(cfg.num_layer_groups)]
        h = m.embed(ids[:, None])
        streams = None
        rotations: dict = {}  # rope_from_latent: the slots' rotations, shared by groups that hold the same positions
        for i, layer in enumerate(m.layers):
            g = self.group_of[i]
            x = layer.input_layernorm(h)
            if i in self.first_of_group:
                self._append(g, x, cos[g], sin[g], start)
                streams = decode_streams(self.cache.latent(g), self.cache.rope(g), lens, self.cache.tail(g))
                if cfg.rope_from_latent:
                    streams = (streams, self._decode_latent(g, streams, lens, rotations),
                               self._query_rotations(g, rotations))
            self._append_key_scale(i, x, start)
            h = layer.attn_residual(h, self._decode_attention(i, x, cos[g], sin[g], lens, streams))
            h = layer.mlp_residual(h)
        self.cache.seq_lens.copy_(lens)
        self.positions += 1
        return self.model.lm_head(m.norm(h[:, 0]))

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode step for every row: ids (B,) -> logits (B, vocab)."""
        self._check_room([1] * self.cache.batch)
        self._check_slots(1)
        if self.use_graphs:
            logits = self._decode_graph(ids)
        else:
            logits = self._decode_eager(ids)
        self.written = [max(w, n + 1) for w, n in zip(self.written, self.lengths)]
        self.lengths = [n + 1 for n in self.lengths]
        self.seen = [n + 1 for n in self.seen]
        if self.policy is not None:
            ones = torch.ones(self.cache.batch, dtype=torch.int32, device=self.device)
            self._apply_policy(self._attention_seen if self.policy.scored else None, ones)
        return logits

    def _decode_graph(self, ids: torch.Tensor) -> torch.Tensor:
        if self._graph is None:
            self._static_ids = ids.clone()
            # The eager warm-up steps advance the device-side lengths and positions: put both back after each
            # (what they wrote into the cache sits in the slot the real step overwrites).
            saved = [(t, t.clone()) for t in (self.cache.seq_lens, self.positions)]

            def restore() -> None:
                for t, v in saved:
                    t.copy_(v)

            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the kernels and settle the allocator outside the capture
                    restore()
                    self._decode_eager(self._static_ids)
            torch.cuda.current_stream().wait_stream(stream)
            restore()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._static_logits = self._decode_eager(self._static_ids)
            restore()  # capturing ran nothing, but keep the invariant explicit
        self._static_ids.copy_(ids)
        self._graph.replay()
        return self._static_logits.clone()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[list[int]],
        opts: SamplingOptions,
        on_token: Callable[[int, int], None] | None = None,
    ) -> tuple[list[list[int]], GenerationStats]:
        """Continue each row's cached context with its prompt, then sample until a stop token or max_new_tokens.

        Returns the new tokens per row (stop tokens excluded) and timings. `on_token(row, token)` streams them.
        A row that has stopped keeps stepping with the others until all have (its later tokens are discarded but
        enter its cache): start a new batch from `reset()`; only batch-1 sessions (chat) continue a cache."""
        opts.check()
        B = self.cache.batch
        if len(prompts) != B:
            raise ValueError(f"the cache has {B} rows, got {len(prompts)} prompts")
        if any(len(p) == 0 for p in prompts):
            raise KvconvertError("every prompt needs at least one token")
        T = max(len(p) for p in prompts)
        self._check_room([T + opts.max_new_tokens - 1] * B)
        ids = torch.zeros(B, T, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        gen = None
        if opts.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(opts.seed if opts.seed is not None else torch.seed())
        stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), batch=B)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = self.prefill_chunked(ids, [len(p) for p in prompts])
        sync()
        stats.prefill_s = time.perf_counter() - t0
        outputs: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        stop = set(opts.stop_token_ids)
        t0 = time.perf_counter()
        for step in range(opts.max_new_tokens):
            tokens = sample(logits, opts, gen)
            host = tokens.tolist()
            for b, t in enumerate(host):
                if done[b]:
                    continue
                if t in stop:
                    done[b] = True
                    continue
                outputs[b].append(t)
                stats.new_tokens += 1
                if on_token is not None:
                    on_token(b, t)
            if all(done) or step == opts.max_new_tokens - 1:
                break
            logits = self.decode(tokens)
            stats.steps += 1
        sync()
        stats.decode_s = time.perf_counter() - t0
        return outputs, stats
