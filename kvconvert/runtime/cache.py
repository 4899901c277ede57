"""LatentCache: the static, preallocated KV cache of a CLLA model.

Per layer group g and per token, up to three streams (byte layout in kvconvert/cache_layout.py):
  latent  the latent's head, kv_latent_dims[g] - kv_tail_dims[g] values at kv_bits: data (B, S, R * bits / 8),
          scales (B, S, R/group, 2) fp16
  tail    with a tail, the latent's last kv_tail_dims[g] values at kv_tail_bits, likewise
  rope    rope_heads*rope_dim values at rope_bits (after RoPE), likewise
and for a qk-norm source, per layer, its key norms (B, S, K) 16-bit (`key_scale(layer)`),
plus `seq_lens` (B,) int32: tokens per row. Row b holds token p at slot p of each group; nothing is ever
concatenated or moved. With `ring_chunk`, a sliding-window group keeps only a ring of window + ring_chunk - 1 slots
(`config.cache_slots`), token p at slot p % size: older tokens are overwritten once they fall out of every
window that a step of at most ring_chunk tokens reads. Everything is allocated once, zero-filled (so padding
slots hold finite values), and `nbytes` equals `kv_bytes(config, capacity, ring_chunk)` per row, the formula of
`profile memory` (tested).
"""

from __future__ import annotations

import torch

from ..config import CllaConfig, cache_slots, kv_bytes
from ..errors import KvconvertError
from ..cache_layout import Stream, stored_width

GIB = 1 << 30


class LatentCache:
    def __init__(
        self,
        config: CllaConfig,
        batch: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype16: torch.dtype = torch.float16,
        ring_chunk: int | None = None,
    ):
        """batch rows of `capacity` tokens; `dtype16` stores 16-bit streams (fp16 or bf16); `ring_chunk`: keep
        sliding-window groups as rings for steps of at most that many tokens (None: every group keeps every token)."""
        if dtype16 not in (torch.float16, torch.bfloat16):
            raise ValueError(f"16-bit streams are stored as fp16 or bf16, not {dtype16}")
        self.config = config
        self.batch = batch
        self.capacity = capacity
        self.device = torch.device(device)
        self.ring_chunk = ring_chunk
        self.slots = cache_slots(config, capacity, ring_chunk)  # per layer group
        # name -> one Stream per layer group (None where the group has no such stream: a tail of width 0)
        self._streams: dict[str, list[Stream | None]] = {}
        per_group = []
        for g in range(config.num_layer_groups):
            (head, head_bits), *tail = config.group_segments(g)
            streams = {"latent": (head, head_bits, config.kv_quant_group)}
            if tail:
                streams["tail"] = (tail[0][0], tail[0][1], config.kv_quant_group)
            if config.rope_dim and not config.rope_from_latent:  # else: rope keys from the latent (rope_keys.py)
                streams["rope"] = (config.rope_heads * config.rope_dim, config.rope_bits, config.rope_quant_group)
            per_group.append(streams)
        try:
            for name in dict.fromkeys(name for streams in per_group for name in streams):
                self._streams[name] = [None if name not in streams else self._stream(batch, n, dtype16, *streams[name])
                                       for n, streams in zip(self.slots, per_group)]
            K = config.num_key_value_heads
            slots_of_layer = [self.slots[g] for g in config.group_of_layer()]
            self._key_scales = [torch.zeros(batch, n, K, dtype=dtype16, device=self.device)
                                for n in slots_of_layer] if config.qk_norm else []
            self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # CPU allocation failures are RuntimeErrors
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e).lower():
                raise
            self._streams.clear()
            self._key_scales = []
            need = kv_bytes(config, capacity, ring_chunk) * batch
            raise KvconvertError(
                f"out of memory allocating the KV cache: {batch} × {capacity:,} tokens need {need / GIB:.2f} GiB on "
                f"{self.device}; lower the batch or the context"
            ) from None

    def _stream(self, batch: int, slots: int, dtype16: torch.dtype, width: int, bits: int, group: int) -> Stream:
        data_dtype = dtype16 if bits >= 16 else torch.uint8
        return Stream(
            torch.zeros(batch, slots, stored_width(width, bits), dtype=data_dtype, device=self.device),
            torch.zeros(batch, slots, width // group, 2, dtype=torch.float16, device=self.device) if bits < 16 else None,
            bits, group, width)

    def latent(self, group: int) -> Stream:
        """The latent (its head, when it has a tail)."""
        return self._streams["latent"][group]

    def tail(self, group: int) -> Stream | None:
        """The latent's low-precision tail (config.kv_tail_dims), or None where group g has none."""
        return self._streams["tail"][group] if "tail" in self._streams else None

    def latent_streams(self, group: int) -> list[Stream]:
        """The streams that hold group g's latent, in the latent's order."""
        return [self.latent(group)] + ([] if self.tail(group) is None else [self.tail(group)])

    def rope(self, group: int) -> Stream | None:
        return self._streams["rope"][group] if "rope" in self._streams else None

    def is_ring(self, group: int) -> bool:
        """Whether group g keeps a ring of fewer slots than the capacity (tokens wrap around it)."""
        return self.slots[group] < self.capacity

    def key_scale(self, layer: int) -> Stream | None:
        """A qk-norm source's key norms of one layer, (B, S, K) 16-bit; None for other sources."""
        if not self._key_scales:
            return None
        data = self._key_scales[layer]
        return Stream(data, None, 16, 1, data.shape[-1])

    def group_streams(self, group: int) -> list[Stream]:
        """Everything group g caches per slot (what a cache policy moves and merges): latent (and its tail), rope
        keys, and the key norms of the group's layers."""
        streams = self.latent_streams(group) + ([] if self.rope(group) is None else [self.rope(group)])
        if self._key_scales:
            streams += [self.key_scale(i) for i in self.config.layer_groups[group]]
        return streams

    @property
    def nbytes(self) -> int:
        """Bytes allocated for cached tokens (the int32 lengths excluded)."""
        streams = [st for group in self._streams.values() for st in group if st is not None]
        return sum(st.data.nbytes + (0 if st.scales is None else st.scales.nbytes) for st in streams) + sum(
            t.nbytes for t in self._key_scales)

    @property
    def bytes_per_token(self) -> int:
        """Allocated bytes per token of capacity (less than kv_bytes_per_token where sliding-window groups are rings)."""
        return self.nbytes // (self.batch * self.capacity)

    def tokens_in_use(self) -> int:
        return int(self.seq_lens.sum())

    def bytes_in_use(self) -> int:
        """Bytes holding tokens now: each row's tokens in every group, a ring's at most its size."""
        return sum(kv_bytes(self.config, n, self.ring_chunk) for n in self.seq_lens.tolist())

    def reset(self) -> None:
        """Forget every row's tokens (the buffers stay allocated; stale values are never read)."""
        self.seq_lens.zero_()
