"""PyTorch references of every kernel: the CPU path of the runtime and the ground truth of the kernel tests.

The cache layout they read and write (`Stream`, the bytes of a cached token): kvconvert/cache_layout.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache_layout import Stream, ring_positions
from ..quant import dequantize_codes, pack_codes, pack_latent, quantize_segments, unpack_codes, unpack_latent


def dequantize_stream(stream: Stream, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `length` positions of every row, as values (B, length, W) in `dtype`."""
    stored = {"latent": stream.data[:, :length]}
    if stream.scales is not None:
        stored["latent_scales"] = stream.scales[:, :length]
    return unpack_latent(stored, stream.bits, stream.group, dtype)


def dequantize_streams(streams: list[Stream], length: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `length` positions of streams side by side (a latent's head, then its tail): (B, length, Σ W). The
    values of `dequantize_stream` each, in one scale-and-offset pass when all share one quantization group."""
    group = streams[0].group
    if len(streams) == 1:
        return dequantize_stream(streams[0], length, dtype)
    if not all(s.bits < 16 and s.group == group for s in streams):
        return torch.cat([dequantize_stream(s, length, dtype) for s in streams], -1)
    codes = torch.cat([unpack_codes(s.data[:, :length], s.bits) for s in streams], -1)
    scales = torch.cat([s.scales[:, :length] for s in streams], -2)
    return dequantize_codes(codes, scales, group, dtype)


def quantize_append_ref(stream: Stream, x: torch.Tensor, start: torch.Tensor) -> None:
    """Quantize x (B, T, W) as the cache stores it and write row b's tokens start[b] .. start[b] + T - 1, token p
    in slot p % S (S: the capacity; past it a sliding-window group's ring wraps around; T <= S).

    start: (B,) int32. Writes in place with tensor indices only (no host sync: CUDA-graph safe). The caller checks
    that start + T fits the cache, or that the stream is a ring.
    """
    B, T, _ = x.shape
    flat = _flat_slots(stream, T, start)
    if stream.bits >= 16:
        _write(stream.data, flat, x.to(stream.data.dtype))
        return
    packed = pack_latent(x, stream.bits, stream.group)
    _write(stream.data, flat, packed["latent"])
    _write(stream.scales, flat, packed["latent_scales"])


def quantize_append_streams_ref(streams: list[Stream], x: torch.Tensor, start: torch.Tensor) -> None:
    """`quantize_append_ref` of x's consecutive column blocks, one per stream (a latent's head and tail): the same
    codes, in fewer ops when every stream is quantized with one group size (one quantization of the whole row)."""
    group = streams[0].group
    joint = len(streams) > 1 and all(s.bits < 16 and s.group == group and s.data.shape[1] == streams[0].data.shape[1]
                                     for s in streams)
    if not joint:
        for s, block in column_blocks(streams, x):
            quantize_append_ref(s, block, start)
        return
    flat = _flat_slots(streams[0], x.shape[1], start)
    codes, scale, zero = quantize_segments(x, [(s.width, s.bits) for s in streams], group)
    scales = torch.stack((scale, zero), dim=-1)
    lo = 0
    for s in streams:
        _write(s.data, flat, pack_codes(codes[..., lo : lo + s.width], s.bits))
        _write(s.scales, flat, scales[..., lo // group : (lo + s.width) // group, :])
        lo += s.width


def column_blocks(streams: list[Stream], x: torch.Tensor):
    """(stream, x's columns for it) of streams whose widths split x's last dim in order."""
    lo = 0
    for s in streams:
        yield s, x[..., lo : lo + s.width]
        lo += s.width


def _flat_slots(stream: Stream, T: int, start: torch.Tensor) -> torch.Tensor:
    """(B * T,) rows of the (B * S, ·) view of a stream's tensors that tokens start[b] + t go to (slot p % S)."""
    B, S = stream.data.shape[:2]
    if T > S:
        raise ValueError(f"{T} tokens do not fit a stream of {S} slots at once")
    slots = (start[:, None].long() + torch.arange(T, device=start.device)) % S
    return (torch.arange(0, B * S, S, device=start.device)[:, None] + slots).view(-1)


def _write(dest: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> None:
    """dest (B, S, ...) at the flat rows `flat` <- values (B, T, ...): one index_copy_, no host sync."""
    B, S = dest.shape[:2]
    dest.view(B * S, *dest.shape[2:]).index_copy_(0, flat, values.reshape(flat.shape[0], *dest.shape[2:]))


@dataclass(frozen=True)
class RopeUp:
    """Rope keys rebuilt from the latent inside decode attention (a plan with rope keys from the latent). Slot s's
    rope keys are `k = weight · c_s + bias` rotated at the position p_s the slot holds, in frequency-pair order:
    (k_2j + i k_2j+1) · scaling · e^(i p_s freq_j) for pair j. Nothing the size of the cache holds them."""

    weight: torch.Tensor  # (Wr, R) the layer's rope_up rows in pair order, over the whole latent (head, then tail)
    bias: torch.Tensor | None  # (Wr,) or None
    freq: torch.Tensor  # (Wr / 2,) fp32, the frequency of each pair
    scaling: float  # the attention scaling of the rotation (1 for plain RoPE)
    # (B, capacity) fp32: the position each slot holds (a cache policy's slot positions); None: slot s of a row of n
    # tokens holds its last position p < n with p % capacity == s (a ring), position s where the row never wrapped
    positions: torch.Tensor | None = None

    @property
    def width(self) -> int:  # Wr, the rope keys' values per slot
        return self.weight.shape[0]


def rope_up_keys(rope_up: RopeUp, c: torch.Tensor, seq_lens: torch.Tensor, capacity: int) -> torch.Tensor:
    """The rotated rope keys (B, S, Wr) of the first S slots whose dequantized latent is c (B, S, R), in c's dtype
    (fp32 rotations for an fp32 latent, as the runtime's reference path makes them)."""
    B, S, _ = c.shape
    k = F.linear(c, rope_up.weight.to(c.dtype), None if rope_up.bias is None else rope_up.bias.to(c.dtype))
    if rope_up.positions is not None:
        pos = rope_up.positions[:, :S]
    else:
        pos = ring_positions(torch.arange(S, device=c.device)[None, :], capacity, seq_lens.long()[:, None])
    real = torch.promote_types(c.dtype, torch.float32)
    angle = pos.to(torch.float32)[..., None].to(real) * rope_up.freq.to(real)
    rot = torch.polar(torch.full_like(angle, rope_up.scaling), angle)
    z = torch.view_as_complex(k.to(real).reshape(B, S, -1, 2).contiguous()) * rot
    return torch.view_as_real(z).reshape(B, S, -1).to(c.dtype)


def latent_decode_ref(
    q_lat: torch.Tensor | None,
    q_rope: torch.Tensor | None,
    latent: Stream,
    rope: Stream | None,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    window: int | None = None,
    log_weights: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    tail: Stream | None = None,
    rope_up: RopeUp | None = None,
) -> torch.Tensor:
    """One decode step of absorbed latent attention: every query head against one latent stream (MQA).

    q_lat: (B, H, R) queries already multiplied by the key up-projection (None when no key dim goes through the
    latent); q_rope: (B, H, Wr) rope queries after RoPE, laid out over the whole rope stream (a head's entries
    outside its own rope head are zero; None without rope); latent: R values per token; rope: Wr values per token;
    seq_lens: (B,) int32 tokens per row (the current one included), token p in slot p % S (S: the streams'
    capacity; a row longer than S has wrapped around, as a sliding-window group's ring does, and holds its last S
    tokens); window: only the last `window` positions are attended (sliding-window layers); log_weights: (B, S) fp32 added to every head's scores of a slot
    (a cache policy's merged slot standing for w tokens carries log w), None = 0; key_scale: (B, S, K) the key norms
    of a qk-norm source (per position and kv head; query head h reads kv head h // (H / K)), None = 1; head_bias:
    (B, H) fp32 q_nope · b_k of a key bias, which the key norms make position-dependent (None = 0); tail: the
    latent's low-precision tail, its values following the head's (R counts both), or None; rope_up: with rope keys
    from the latent, what rebuilds them from the latent (`RopeUp`; `rope` is then None and q_rope is laid over its
    Wr values).
    score[b, h, s] = (q_lat · latent[s] + q_rope · rope[s] + head_bias[b, h]) * key_scale[b, s, kv(h)] * softmax_scale
                     + log_weights[b, s]
    out[b, h] = Σ_s softmax(score) latent[s]
    Returns (B, H, R) in q's dtype; computed in fp32 (fp64 for fp64 queries).
    """
    scores, c = _masked_scores(q_lat, q_rope, latent, rope, seq_lens, softmax_scale, window, log_weights, key_scale,
                               head_bias, tail, rope_up)
    q = q_lat if q_lat is not None else q_rope
    return torch.bmm(scores.softmax(-1), c).to(q.dtype)


def _masked_scores(q_lat, q_rope, latent, rope, seq_lens, softmax_scale, window, log_weights, key_scale=None,
                   head_bias=None, tail=None, rope_up=None):
    """Scores (B, H, S) over the first S = min(max(seq_lens), capacity) slots (-inf where masked) and the latent
    (B, S, R)."""
    S = min(int(seq_lens.max()), latent.data.shape[1])
    q = q_lat if q_lat is not None else q_rope
    compute = torch.promote_types(q.dtype, torch.float32)
    c = dequantize_streams([latent] + ([] if tail is None else [tail]), S, compute)  # (B, S, R)
    # (B, H, S): the latent's and the rope keys' terms, each one batched matmul (no concatenated keys)
    scores = None if q_lat is None else torch.bmm(q_lat.to(compute), c.transpose(1, 2))
    if q_rope is not None:
        if rope_up is not None:
            k_rope = rope_up_keys(rope_up, c, seq_lens, latent.data.shape[1]).transpose(1, 2)
        else:
            k_rope = dequantize_stream(rope, S, compute).transpose(1, 2)
        q_rope = q_rope.to(compute)
        scores = torch.bmm(q_rope, k_rope) if scores is None else torch.baddbmm(scores, q_rope, k_rope)
    if head_bias is not None:
        scores = scores + head_bias.to(compute)[:, :, None]
    scores = scores * softmax_scale
    if key_scale is not None:
        H, K = q.shape[1], key_scale.shape[-1]
        scores = scores * key_scale[:, :S].to(compute).transpose(1, 2).repeat_interleave(H // K, dim=1)
    if log_weights is not None:
        scores = scores + log_weights[:, None, :S].to(compute)
    if window is not None or int(seq_lens.min()) != S:  # ragged rows or a sliding window: mask slots
        slot = torch.arange(S, device=c.device)[None, :]
        lens = seq_lens.long()[:, None]
        valid = slot < lens
        if window is not None:  # a slot's age: how many tokens ago it was written (modulo a wrapped ring's size)
            valid &= (lens - 1 - slot) % latent.data.shape[1] < window
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return scores, c


def latent_attention_weights_ref(
    q_lat, q_rope, latent: Stream, rope: Stream | None, seq_lens, softmax_scale: float, window=None, log_weights=None,
    key_scale=None, head_bias=None, tail=None, rope_up=None,
) -> torch.Tensor:
    """The attention each cached slot receives in `latent_decode_ref`, summed over the query heads: (B, capacity)
    fp32, zero past each row's length. What score-based cache policies accumulate."""
    scores, _ = _masked_scores(q_lat, q_rope, latent, rope, seq_lens, softmax_scale, window, log_weights, key_scale,
                               head_bias, tail, rope_up)
    out = torch.zeros(scores.shape[0], latent.data.shape[1], dtype=torch.float32, device=scores.device)
    out[:, : scores.shape[-1]] = scores.softmax(-1).sum(1).float()
    return out
