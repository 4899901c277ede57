"""The layout of the latent cache: `Stream` (the tensors of one cached stream) and the bytes a cached token takes.

Per layer group and per token the cache holds up to three streams: the latent, its low-precision tail, the rope
keys (runtime/cache.py says which a model has). Each stream is W values per token; per batch row b and slot s:

  bits 16:  data[b, s, :W]             fp16 or bf16 values
  bits 8:   data[b, s, :W]             uint8 codes
  bits 4:   data[b, s, :W/2]           uint8, value 2i in the low nibble of byte i, value 2i+1 in the high nibble
  bits 2:   data[b, s, :W/4]           uint8, value 4i+j in bits [2j, 2j+2) of byte i
  bits < 16: scales[b, s, j, 0/1]      fp16 scale and zero-point of values [j*group, (j+1)*group)
             value = code * scale + zero

Bytes per token of a stream = W * bits / 8 + (W / group) * 4 below 16 bits: the formula `profile memory` prints.
A latent with a tail (CllaConfig.kv_tail_dim) is two streams, head then tail: the kernels read it as their
concatenation (the tail's columns follow the head's in q_lat and the output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Stream:
    """One cached stream of one layer group: `data` (B, S, W or W/2) and `scales` (B, S, W/group, 2) fp16 or None."""

    data: torch.Tensor
    scales: torch.Tensor | None
    bits: int
    group: int
    width: int  # W, values per token

    def rows(self, b: slice | int = slice(None)) -> Stream:
        return Stream(self.data[b], None if self.scales is None else self.scales[b], self.bits, self.group, self.width)


def ring_positions(slot: torch.Tensor, n: int, after: torch.Tensor) -> torch.Tensor:
    """The token position slot s of a ring of n slots holds: the last p < after with p % n == s (negative where
    nothing was written yet). Broadcasts slot against after (one past the last position written, per row). A stream
    that never wrapped (after <= n) holds position s at slot s."""
    return slot + n * torch.div(after - 1 - slot, n, rounding_mode="floor")


def stored_width(width: int, bits: int) -> int:
    """Elements per token of a stream's data tensor: below 8 bits, 8 // bits values per byte."""
    return -(-width * bits // 8) if bits < 8 else width
