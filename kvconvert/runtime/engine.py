"""LatentRuntime: prefill into a LatentCache, then absorbed decode over the quantized latent.

Prefill (T new tokens per row, rows right-padded): each group's first layer quantizes its latent and rope keys
into the cache (kernels.quantize_append); attention reads the group's cache back (dequantized), reconstructs keys
and values with the layer's own up-projections and runs SDPA: the model's own attention code, so prefill is
exactly what the model computes. Where its head dims are narrower, prompt attention runs absorbed instead, as
decode does (prompt.py).

Decode (one token per row): the up-projections are absorbed into the query and output projections (absorb.py) and
every query head reads its group's latent stream (kernels.latent_decode). With rope keys from the latent
(config.rope_from_latent) nothing but the latent is cached: rope_keys.py. Every step runs under inference_mode.
The decode step has no host synchronisation and fixed shapes, so on CUDA it is captured once in a CUDA graph and
replayed (graphs.py); on CPU the same code runs on the PyTorch references.

Sizing: `LatentRuntime.for_context` allocates the cache for a context, a cache policy and its prefill chunk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import RING_CHUNK, group_window
from ..errors import KvconvertError
from ..kernels import (decode_streams, dequantize_stream, dequantize_streams, latent_attention_weights, latent_decode,
                       quantize_append, quantize_append_streams)
from ..model import CllaForCausalLM, apply_rope, rope_cos_sin, rope_inv_freq
from .absorb import AbsorbedProjections
from .cache import LatentCache
from .graphs import DecodeGraph
from .layout import gemv_layout_
from .policies.base import RECONSTRUCT_CHUNK, RECONSTRUCT_POOL
from .prompt import PromptMasks, absorbed_prompt_attention, prompt_attention_seen
from .rope_keys import RopeFromLatent
from .sampling import GenerationStats, SamplingOptions, sample


# The smallest filled-length bucket of a decode step (LatentRuntime.filled_bucket): below it, splitting a
# few hundred slots further buys nothing, and fewer buckets mean fewer captured graphs.
FILLED_BUCKET_MIN = 256

class LatentRuntime:
    """Runs a CllaForCausalLM over a LatentCache of `batch` rows × `capacity` slots."""

    def __init__(
        self,
        model: CllaForCausalLM,
        batch: int,
        capacity: int,
        cuda_graphs: bool | None = None,
        policy=None,
        context: int | None = None,
        ring_chunk: int | None = RING_CHUNK,
        cpu_layout: bool = False,
    ):
        """policy: a token-budget cache policy (runtime/policies) whose budget is a share of `context` (the longest
        conversation in tokens; default: the capacity); the slots past the budget bound a prefill step
        (`prefill_chunk`), after which the policy compresses back to the budget. `for_context` sizes all this.
        ring_chunk: sliding-window layer groups keep a ring of window + ring_chunk - 1 slots, and a prefill step
        takes at most ring_chunk tokens (None, or under a policy: every group keeps every token).
        cpu_layout: on CPU, re-lay out the wide Linear weights of `model` itself, in place, for matrix-vector
        products (the same values and shapes, input-major storage: runtime/layout.py). Off by default, so that a
        runtime never changes the caller's model; it pays at one row (bench/studies/gemv_layout.py measures it), where
        `kvconvert chat` and `profile speed` ask for it."""
        self.model = model.eval()
        self.config = cfg = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cpu_layout = cpu_layout and self.device.type == "cpu"
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
        self.prefill_chunk = None  # under a policy: the most tokens a prefill step takes before it compresses
        if policy is not None:
            slots = policy.slots(self.context)
            if capacity <= slots:
                raise KvconvertError(f"a cache of {capacity:,} slots leaves no room past the {slots:,}-slot budget")
            policy.setup(cfg.num_layer_groups, batch, capacity, slots, self.device)
            self.prefill_chunk = capacity - slots
            cuda_graphs = False  # a decode step's eviction needs no host sync (evict_one), but runs outside the graph
        self.group_of = cfg.group_of_layer()
        self.first_of_group = {g[0] for g in cfg.layer_groups}
        self.inv_freq = rope_inv_freq(cfg, self.device)
        self.rope_from_latent = (RopeFromLatent(model, self.cache, policy, self.inv_freq, self.dtype)
                                 if cfg.rope_from_latent else None)
        self.absorbed = AbsorbedProjections(model, self.cpu_layout, self.rope_from_latent)
        self.layers, self.dims, self.softmax_scale = self.absorbed.layers, self.absorbed.dims, cfg.softmax_scale
        # Prompt attention absorbed too (MQA over the latent, as decode) where its head dims are narrower than the
        # reconstructed keys and values: scores over R + Hr·Dr dims and values over R, against Dn + Dr and Dv
        # (each pair padded to one width for the fused SDPA kernel). Narrow latents win (SmolLM2 at 2%: 64 vs 96);
        # wide ones and the identity plan keep the model's own attention.
        Hr, Dr = cfg.rope_heads, cfg.rope_dim
        absorbed = max((cfg.kv_latent_dim if cfg.qk_nope_dim else 0) + Hr * Dr, cfg.kv_latent_dim)  # widest group
        self.absorbed_prefill = absorbed < max(cfg.qk_nope_dim + Dr, cfg.head_dim)
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and self.device.type != "cuda":
            raise KvconvertError("CUDA graphs need a CUDA device")
        self.use_graphs = use_graphs
        self._graphs: dict[int, DecodeGraph] = {}  # one captured decode step per filled-length bucket

    @classmethod
    def for_context(cls, model: CllaForCausalLM, batch: int, context: int, policy=None, prefill_chunk: int = 256,
                    **options) -> LatentRuntime:
        """A runtime for conversations of up to `context` tokens per row: a cache of `context` slots, or under a
        cache policy its budget of the context plus `prefill_chunk` slots (a prefill step then takes at most
        `prefill_chunk` tokens before the policy compresses back to the budget). options: __init__'s
        (cuda_graphs, ring_chunk, cpu_layout)."""
        capacity = context
        if policy is not None:
            try:
                capacity = policy.slots(context) + prefill_chunk
            except ValueError as e:  # a budget too small for the policy
                raise KvconvertError(str(e)) from None
        return cls(model, batch, capacity, policy=policy, context=context, **options)

    def extra_weight_bytes(self) -> int:
        """Bytes of the folded weights the runtime holds beside the model's own (views of the model excluded)."""
        own = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen: set[int] = set()
        total = 0
        held = [t for lay in self.layers for t in lay.tensors()]
        if self.rope_from_latent is not None:
            held += self.rope_from_latent.weights()
        for t in held:
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

    def _layer_rope(self, i: int, latent: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Layer i's rope keys (B, Hr, S, Dr): the group's cached ones, or (rope_from_latent, `rope` then being the
        slots' rotations) the rope keys from the latent (B, S, R)."""
        if self.rope_from_latent is None:
            return rope
        return self.rope_from_latent.layer_keys(i, latent, rope)

    def _read_group(self, g: int, S: int, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first S slots of group g as the model's attention takes them: latent (B, S, R), rope (B, Hr, S, Dr)
        (rope_from_latent: the slots' rotations, see CllaLatentProjection.forward; `after`: per row, one past the last
        slot written, which places a ring's slots)."""
        cfg = self.config
        latent = dequantize_streams(self.cache.latent_streams(g), S, self.dtype)
        if self.rope_from_latent is not None:
            return latent, self.rope_from_latent.slot_rotations(g, S, after)
        rope = self.cache.rope(g)
        B = latent.shape[0]
        if rope is None:
            return latent, latent.new_zeros(B, 1, S, 0)
        k_rope = dequantize_stream(rope, S, self.dtype).view(B, S, cfg.rope_heads, cfg.rope_dim).transpose(1, 2)
        return latent, k_rope

    def _decode_attention(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lens: torch.Tensor, streams,
                          filled: int | None = None):
        """Absorbed attention of layer i for one token per row: x (B, 1, hidden) -> (B, 1, hidden).
        cos/sin (B, Hr, 1, Dr) at each row's position; streams: the group's (latent, rope, tail) as kernels read them."""
        lay = self.layers[i]
        log_w, window = self.log_weights(self.group_of[i]), lay.window
        if window is not None and self.policy is not None:  # slots are not positions: a window by the slot's token's
            pos = self.policy.states[self.group_of[i]].pos
            log_w, window = log_w.masked_fill(self.positions.long()[:, None] - pos >= window, -math.inf), None
        ks = self._key_scale(i)
        rope_up = None
        if self.rope_from_latent is not None:  # streams: (the latent's kernel streams, decode_keys', query rotations)
            (latent, _, tail), keys, q_rot = streams
            q_lat, q_rope, head_bias = self.absorbed.queries(i, x[:, 0], cos, sin, q_rot)  # rope dims in pair order
            rope, rope_up = self.rope_from_latent.layer_keys_for_decode(i, self.group_of[i], keys)
        else:
            q_lat, q_rope, head_bias = self.absorbed.queries(i, x[:, 0], cos, sin)
            latent, rope, tail = streams
        o_lat = latent_decode(q_lat, q_rope, latent, rope, lens, self.softmax_scale, window, log_weights=log_w,
                              key_scale=ks, head_bias=head_bias, tail=tail, rope_up=rope_up, filled=filled)
        if self.policy is not None and self.policy.observing:
            seen = latent_attention_weights(q_lat, q_rope, latent, rope, lens, self.softmax_scale, window, log_w,
                                            ks, head_bias, tail, rope_up)
            self._attention_seen[self.group_of[i]][:, : seen.shape[1]] += seen
        return self.absorbed.output(i, o_lat)[:, None]

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
        masks = PromptMasks(cfg, self.cache, policy, start, positions, S, all(n == 0 for n in self.lengths), self.dtype)
        scored = policy is not None and policy.observing
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
            allowed, mask = masks.layer(i)
            if policy is not None and mask is not None:
                mask = mask + self.log_weights(g)[:, None, None, :S].to(self.dtype)  # merged slots: + log(count)
            rope_i = self._layer_rope(i, latent, k_rope) if self.absorbed_prefill or scored else None
            if self.absorbed_prefill:
                attn = absorbed_prompt_attention(self.absorbed, i, x, cos[g], sin[g], latent, rope_i, mask, key_scale)
            else:
                attn = layer.self_attn(x, latent, k_rope, cos[g], sin[g], mask,
                                       None if key_scale is None else key_scale.transpose(1, 2))
            h = layer.attn_residual(h, attn)
            if scored:
                seen = prompt_attention_seen(self.absorbed, policy, i, x, cos[g], sin[g], latent, rope_i, allowed, n_new,
                                             self.log_weights(g), key_scale, strongest=policy.collecting)
                attention_seen[g] = torch.maximum(attention_seen[g], seen) if policy.collecting else attention_seen[g] + seen
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

    def _apply_policy(self, attention_seen, steps: torch.Tensor) -> None:
        """After a step: decay and add the attention the slots received, then bring every group to its budget."""
        policy = self.policy
        steady = policy.steady(self.lengths)  # one slot over: evicted on the device, no host sync (evict_one)
        counts = None
        for g in range(self.config.num_layer_groups):
            if attention_seen is not None:
                policy.observe(g, attention_seen[g], steps)
            if steady:
                policy.evict_one(g, self.cache.group_streams(g), self.cache.seq_lens, self.positions)
                continue
            new = policy.compress(g, self.cache.group_streams(g), self.lengths, self.seen)
            if counts is not None and new != counts:
                raise RuntimeError(f"groups disagree on slot counts: {counts} vs {new}")
            counts = new
        if steady:
            self.cache.seq_lens -= (self.cache.seq_lens > policy.n_slots).to(torch.int32)
            self.lengths = [min(n, policy.n_slots) for n in self.lengths]
        elif counts != self.lengths:
            self.lengths = counts
            self.cache.seq_lens.copy_(torch.tensor(counts, dtype=torch.int32, device=self.device))

    @torch.inference_mode()
    def prefill_reconstructed(self, ids: list[int], repeat: list[int], chunk: int = RECONSTRUCT_CHUNK) -> torch.Tensor:
        """A fresh batch-1 prompt, compressed to the policy's budget by `score_by_reconstruction` and `compress`;
        returns the logits (1, vocab) at its last token."""
        logits = self.score_by_reconstruction(ids, repeat, chunk)
        self.compress()
        return logits

    @torch.inference_mode()
    def score_by_reconstruction(self, ids: list[int], repeat: list[int], chunk: int = RECONSTRUCT_CHUNK) -> torch.Tensor:
        """Query-agnostic scores for a prompt (the idea of KVzip, Kim et al. 2025, arXiv 2505.23416: keep what the
        model needs to say the context again). Prefill `ids` whole into a fresh batch-1 cache, uncompressed; then, a
        chunk of the prompt at a time, read `repeat` (an instruction to repeat the text) and that chunk again after
        it, and score every prompt slot by the strongest attention any query of that reading gives it in any head and
        layer of its group; then give each slot the highest score within RECONSTRUCT_POOL slots of it, so that a
        span (a number's digits, a name) is kept or dropped together (SnapKV's pooling, Li et al. 2024, arXiv
        2404.14469), and every group the mean of the groups' scores, so that all keep the same tokens: the layers
        where the reading attends sharply choose for those where it is diffuse (per group, a needle's digits survived
        in under half the layers of SmolLM2; docs/results.md). Each reading is dropped afterwards: the cache holds the
        prompt as a plain prefill leaves it, with the policy's scores set. The cache needs room for the prompt,
        `repeat` and one chunk. Returns the logits (1, vocab) at the prompt's last token."""
        policy = self.policy
        if policy is None or not policy.scored or self.cache.batch != 1 or self.seen != [0]:
            raise ValueError("reconstruction scores need a scored policy and a fresh batch-1 runtime")
        n = len(ids)
        policy.hold()
        logits = self.prefill_chunked(torch.tensor([ids], device=self.device), [n])
        for st in policy.states:
            st.score.zero_()
        state = (self.lengths, self.seen, self.written, self.positions.clone(), self.context)
        policy.collecting = True
        try:
            for lo in range(0, n, chunk):
                part = repeat + ids[lo : lo + chunk]
                self.context = max(self.context, n + len(part))  # the reading runs past the conversation's end
                self.prefill(torch.tensor([part], device=self.device), [len(part)])
                self.lengths, self.seen, self.written, _, self.context = state
                self.positions.copy_(state[3])
                self.cache.seq_lens.fill_(n)
        finally:
            policy.collecting = policy.held = False
        # a span is kept whole (each slot scores the most of its RECONSTRUCT_POOL neighbours), by every group alike
        pooled = [F.max_pool1d(st.score[:, None, :n], RECONSTRUCT_POOL, 1, RECONSTRUCT_POOL // 2)[:, 0]
                  for st in policy.states]
        shared = torch.stack(pooled).mean(0)
        for st in policy.states:
            st.score[:, :n] = shared
        return logits

    def compress(self) -> None:
        """Bring every row back to the policy's budget now, by the scores it has."""
        self._apply_policy(None, None)

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
            chunk = min(chunk, self.prefill_chunk)
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

    def _decode_eager(self, ids: torch.Tensor, filled: int | None = None) -> torch.Tensor:
        """One token per row, ids (B,) -> logits (B, vocab); appends at seq_lens and advances it (device-side).
        filled: a bound on every row's length after the step (`filled_bucket`), which sizes the kernels' grids."""
        cfg = self.config
        m = self.model.model
        start = self.cache.seq_lens
        lens = start + 1
        if self.rope_from_latent is not None:  # queries and keys rotate by complex products instead
            cos = sin = [None] * cfg.num_layer_groups
        else:
            cos, sin = rope_cos_sin(cfg, self.positions.long()[:, None], self.dtype, self.inv_freq)  # (NG,B,Hr,1,Dr)
        if self.policy is not None:
            for g in range(cfg.num_layer_groups):
                self.policy.appended(g, start, self.positions.long()[:, None])
            if self.policy.observing:
                self._attention_seen = [torch.zeros(ids.shape[0], self.cache.capacity, device=self.device)
                                        for _ in range(cfg.num_layer_groups)]
        h = m.embed(ids[:, None])
        streams = None
        rotations: dict = {}  # rope_from_latent: this step's rotations, shared by groups that hold the same positions
        for i, layer in enumerate(m.layers):
            g = self.group_of[i]
            x = layer.input_layernorm(h)
            if i in self.first_of_group:
                self._append(g, x, cos[g], sin[g], start)
                streams = decode_streams(self.cache.latent(g), self.cache.rope(g), lens, self.cache.tail(g))
                if self.rope_from_latent is not None:
                    keys = self.rope_from_latent
                    streams = (streams, keys.decode_keys(g, streams, lens, rotations),
                               keys.query_rotations(g, self.positions, rotations))
            self._append_key_scale(i, x, start)
            h = layer.attn_residual(h, self._decode_attention(i, x, cos[g], sin[g], lens, streams, filled))
            h = layer.mlp_residual(h)
        self.cache.seq_lens.copy_(lens)
        self.positions += 1
        return self.model.lm_head(m.norm(h[:, 0]))

    def filled_bucket(self) -> int:
        """The power of two (at least FILLED_BUCKET_MIN) at or above every row's length after a decode step, from
        the host's copy of the lengths: the decode kernels' grids cover that many slots, not the whole capacity,
        and a CUDA graph is captured once per bucket (a handful per context: 256, 512, ... up to the capacity)."""
        return max(FILLED_BUCKET_MIN, 1 << max(self.lengths + [0]).bit_length())

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode step for every row: ids (B,) -> logits (B, vocab)."""
        self._check_room([1] * self.cache.batch)
        self._check_slots(1)
        filled = self.filled_bucket()
        if self.use_graphs:  # a graph per bucket: its grids hold for every length up to the bucket
            if filled not in self._graphs:
                self._graphs[filled] = DecodeGraph([self.cache.seq_lens, self.positions])
            logits = self._graphs[filled](lambda t: self._decode_eager(t, filled), ids)
        else:
            logits = self._decode_eager(ids, filled)
        self.written = [max(w, n + 1) for w, n in zip(self.written, self.lengths)]
        self.lengths = [n + 1 for n in self.lengths]
        self.seen = [n + 1 for n in self.seen]
        if self.policy is not None:
            ones = torch.ones(self.cache.batch, dtype=torch.int32, device=self.device)
            self._apply_policy(self._attention_seen if self.policy.observing else None, ones)
        return logits

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
