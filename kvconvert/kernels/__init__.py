"""Kernel dispatch, and the only place that decides: Triton when the tensors are on CUDA or TRITON_INTERPRET=1 is
set (the CPU interpreter, for tests), the PyTorch reference otherwise. Signatures: reference.py; the cache layout
they read and write: kvconvert/cache_layout.py."""

from __future__ import annotations

import os

import torch

from ..cache_layout import Stream
from .reference import (RopeUp, column_blocks, dequantize_stream, dequantize_streams, latent_attention_weights_ref,
                        latent_decode_ref, quantize_append_ref, quantize_append_streams_ref)

__all__ = [
    "RopeUp", "decode_streams", "dequantize_stream", "dequantize_streams", "latent_attention_weights", "latent_decode",
    "quantize_append", "quantize_append_streams", "uses_triton",
]

# The attention each slot receives (for score-based cache policies) has only the PyTorch version on every device:
# a fused kernel would emit it from the decode kernel's second pass (not written yet).
latent_attention_weights = latent_attention_weights_ref


def uses_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def latent_decode(
    q_lat: torch.Tensor | None,
    q_rope: torch.Tensor | None,
    latent: Stream,
    rope: Stream | None,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    window: int | None = None,
    num_splits: int | None = None,
    log_weights: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    head_bias: torch.Tensor | None = None,
    tail: Stream | None = None,
    rope_up: RopeUp | None = None,
    filled: int | None = None,
) -> torch.Tensor:
    """Absorbed decode attention over a quantized latent stream (and its tail), rope keys read from their stream or
    rebuilt from the latent (`rope_up`): (B, H, R). See `latent_decode_ref`. filled: a bound the host knows on
    every row's min(seq_len, capacity), which sizes the Triton grid by the filled slots rather than the capacity
    (None: the capacity); the reference reads the lengths themselves."""
    if uses_triton(latent.data):
        from .decode_attention import latent_decode_triton

        return latent_decode_triton(q_lat, q_rope, latent, rope, seq_lens, softmax_scale, window, num_splits, log_weights,
                                    key_scale, head_bias, tail, rope_up, filled)
    return latent_decode_ref(q_lat, q_rope, latent, rope, seq_lens, softmax_scale, window, log_weights, key_scale,
                             head_bias, tail, rope_up)


def quantize_append(stream: Stream, x: torch.Tensor, start: torch.Tensor) -> None:
    """Quantize x (B, T, W) into `stream` at slots (start[b] + t) % capacity, in place. See `quantize_append_ref`."""
    if uses_triton(stream.data):
        from .quantize import quantize_append_triton

        return quantize_append_triton(stream, x, start)
    return quantize_append_ref(stream, x, start)


def quantize_append_streams(streams: list[Stream], x: torch.Tensor, start: torch.Tensor) -> None:
    """`quantize_append` of x's consecutive column blocks, one per stream (a latent's head, then its tail)."""
    if uses_triton(streams[0].data):
        for s, block in column_blocks(streams, x):
            quantize_append(s, block, start)
        return
    quantize_append_streams_ref(streams, x, start)


def decode_streams(latent: Stream, rope: Stream | None, seq_lens: torch.Tensor, tail: Stream | None = None
                   ) -> tuple[Stream, Stream | None, Stream | None]:
    """A group's streams (latent, rope, tail) as its layers' decode attention reads them in one step: the cache
    itself for the Triton kernel (it dequantizes in registers); for the reference, the valid positions dequantized
    once to fp32 (a group of G layers would otherwise dequantize them G times), the tail joined to the latent."""
    if uses_triton(latent.data):
        return latent, rope, tail
    S = min(int(seq_lens.max()), latent.data.shape[1])  # a wrapped ring: all its slots

    def plain(*streams: Stream | None) -> Stream | None:
        present = [s for s in streams if s is not None]
        if not present:
            return None
        data = dequantize_streams(present, S, torch.float32)
        return Stream(data, None, 16, 1, data.shape[-1])

    return plain(latent, tail), plain(rope), None
