"""LatentCache: the static, preallocated KV cache of a CLLA model.

Per layer group g and per token, two streams (byte layout in kernels/reference.py):
  latent  kv_latent_dim values at kv_bits    latent_data[g] (B, S, R or R/2), latent_scales[g] (B, S, R/group, 2) fp16
  rope    rope_heads*rope_dim values at rope_bits (after RoPE), rope_data[g], rope_scales[g] likewise
and for a qk-norm source, per layer, its key norms (B, S, K) 16-bit (`key_scale(layer)`),
plus `seq_lens` (B,) int32: valid positions per row. Row b holds its tokens at positions 0 .. seq_lens[b] - 1;
nothing is ever concatenated or moved. Everything is allocated once, zero-filled (so padding positions hold finite
values), and `nbytes / (batch * capacity)` equals the per-token formula of `profile memory` (tested).
"""

from __future__ import annotations

import torch

from ..config import CllaConfig, kv_bytes_per_token
from ..errors import KvconvertError
from ..kernels import Stream

GIB = 1 << 30


def stored_width(width: int, bits: int) -> int:
    """Elements per token of a stream's data tensor: int4 packs two values per byte."""
    return (width + 1) // 2 if bits == 4 else width


class LatentCache:
    def __init__(
        self,
        config: CllaConfig,
        batch: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype16: torch.dtype = torch.float16,
    ):
        """batch rows of `capacity` positions; `dtype16` stores 16-bit streams (fp16 or bf16)."""
        if dtype16 not in (torch.float16, torch.bfloat16):
            raise ValueError(f"16-bit streams are stored as fp16 or bf16, not {dtype16}")
        self.config = config
        self.batch = batch
        self.capacity = capacity
        self.device = torch.device(device)
        NG = config.num_layer_groups
        shape = (NG, batch, capacity)
        streams = [("latent", config.kv_latent_dim, config.kv_bits, config.kv_quant_group)]
        if config.rope_dim:
            streams.append(("rope", config.rope_heads * config.rope_dim, config.rope_bits, config.rope_quant_group))
        self._streams: dict[str, tuple[torch.Tensor, torch.Tensor | None, int, int, int]] = {}
        try:
            for name, width, bits, group in streams:
                data_dtype = dtype16 if bits >= 16 else torch.uint8
                data = torch.zeros(*shape, stored_width(width, bits), dtype=data_dtype, device=self.device)
                scales = (
                    torch.zeros(*shape, width // group, 2, dtype=torch.float16, device=self.device) if bits < 16 else None
                )
                self._streams[name] = (data, scales, bits, group, width)
            K = config.num_key_value_heads
            self._key_scales = [torch.zeros(batch, capacity, K, dtype=dtype16, device=self.device)
                                for _ in range(config.num_hidden_layers)] if config.qk_norm else []
            self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # CPU allocation failures are RuntimeErrors
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e).lower():
                raise
            self._streams.clear()
            self._key_scales = []
            need = kv_bytes_per_token(config) * batch * capacity
            raise KvconvertError(
                f"out of memory allocating the KV cache: {batch} × {capacity:,} tokens need {need / GIB:.2f} GiB on "
                f"{self.device}; lower the batch or the context"
            ) from None

    def latent(self, group: int) -> Stream:
        data, scales, bits, qgroup, width = self._streams["latent"]
        return Stream(data[group], None if scales is None else scales[group], bits, qgroup, width)

    def rope(self, group: int) -> Stream | None:
        if "rope" not in self._streams:
            return None
        data, scales, bits, qgroup, width = self._streams["rope"]
        return Stream(data[group], None if scales is None else scales[group], bits, qgroup, width)

    def key_scale(self, layer: int) -> Stream | None:
        """A qk-norm source's key norms of one layer, (B, S, K) 16-bit; None for other sources."""
        if not self._key_scales:
            return None
        data = self._key_scales[layer]
        return Stream(data, None, 16, 1, data.shape[-1])

    def group_streams(self, group: int) -> list[Stream]:
        """Everything group g caches per slot (what a cache policy moves and merges): latent, rope keys, and the
        key norms of the group's layers."""
        streams = [self.latent(group)] + ([] if self.rope(group) is None else [self.rope(group)])
        if self._key_scales:
            streams += [self.key_scale(i) for i in self.config.layer_groups[group]]
        return streams

    @property
    def nbytes(self) -> int:
        """Bytes allocated for cached tokens (the int32 lengths excluded)."""
        return sum(d.nbytes + (0 if s is None else s.nbytes) for d, s, *_ in self._streams.values()) + sum(
            t.nbytes for t in self._key_scales)

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // (self.batch * self.capacity)

    def tokens_in_use(self) -> int:
        return int(self.seq_lens.sum())

    def bytes_in_use(self) -> int:
        return self.tokens_in_use() * self.bytes_per_token

    def reset(self) -> None:
        """Forget every row's tokens (the buffers stay allocated; stale values are never read)."""
        self.seq_lens.zero_()
