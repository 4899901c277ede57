"""CllaConfig: the transformers config of a Cross-Layer Latent Attention model, holding the whole plan.

What is cached per token and per layer group g (docs/design.md, "The model: what is cached"):
  latent  c      = quant(W_dkv[g] · x_first)   kv_latent_dim values: the first kv_latent_dim - kv_tail_dim at kv_bits,
                   the last kv_tail_dim (the latent's low-energy tail) at kv_tail_bits
                   (+ one fp16 scale and one fp16 zero-point per kv_quant_group values when quantized)
  rope key k_r   = RoPE(W_kr[g] · x_first)     rope_heads × rope_dim values at rope_bits
                   (+ one fp16 scale and zero-point per rope head when rope_bits < 16)
and with qk_norm, per layer l of the group, the key norm r_l = gain / RMS(W_k[l] · x_l) of each kv head (16-bit).
With rope_from_latent (rope keys from the latent) nothing but the latent is cached: layer l's rope keys are
RoPE(W_ur[l] · c) at the slot's position (keys that are low-rank before RoPE, not after).
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

SUPPORTED_KV_BITS = (16, 8, 4, 2)
SCALE_BYTES = 2  # scales and zero-points are stored as fp16
CACHE_ELEMENT_BYTES_16 = 2  # a 16-bit cache stores fp16/bf16


class CllaConfig(PretrainedConfig):
    """Config of `CllaForCausalLM`.

    Source-model fields mirror Llama's (`hidden_size`, `num_attention_heads`, ...). The plan fields are:

    - `layer_groups`: list of lists of consecutive layer indices; each group shares one latent stream.
    - `kv_latent_dim` (R): latent width per group.
    - `qk_nope_dim`: per-head query/key dims scored through the latent (keys reconstructed by `k_up`).
    - `rope_dim`: per-head query/key dims that carry RoPE (even); `rope_heads` rope-key heads per group,
      query head h reads rope head h // (num_attention_heads // rope_heads).
    - `rope_freq_index`: per layer group and rope head, the `rope_dim // 2` RoPE frequency indices kept
      (rotate-half layout: dims [i, i + rope_dim/2] rotate with frequency `rope_inv_freq[rope_freq_index[g][r][i]]`).
    - `kv_bits` (16, 8, 4, 2) and `kv_quant_group`: latent storage; asymmetric group-wise quantization.
    - `kv_tail_dim`, `kv_tail_bits`: a mixed-precision latent. The latent's dims come in order of energy (the
      regression's order; each segment rotated on its own), and the last kv_tail_dim of them are stored at
      kv_tail_bits < kv_bits in a second stream (`group_segments`). 0: one precision throughout.
    - `kv_latent_dims`, `kv_tail_dims`: per layer group, its latent width and tail (default: kv_latent_dim and
      kv_tail_dim for every group). Groups may differ (bytes spent where the error is: convert/plan.py,
      `water_fill`); kv_latent_dim and kv_tail_dim are then the widest group's.
    - `rope_from_latent`: rope keys from the latent. They are not cached: each layer computes its pre-RoPE rope
      keys from the latent (`rope_up`, per layer: rope_heads × rope_dim rows over the latent) and rotates them at
      each slot's position. Pre-RoPE keys share the latent's low rank (every key dim through the latent beats a
      separately cached rope key at equal bytes: docs/results.md), at the cost of computing rope keys at decode.
    - `rope_bits` (16, 8, 4, 2): rope-key storage (cached rope keys only); quantized in groups of
      `rope_quant_group` = gcd(rope_dim, kv_quant_group) dims of each rope head, one fp16 scale and zero-point per
      group.
    - `layer_windows`: per layer, a sliding-window length or None (full attention).
    - `embed_scale`: token embeddings are multiplied by it (in the weights' dtype), as Gemma does (sqrt(hidden)).
    - `sandwich_norms`: RMSNorms on the attention output and on the MLP output too (Gemma 2/3's four norms per
      layer), besides the usual pre-attention and pre-MLP ones.
    - `latent_norm`: an RMSNorm on the latent before it is cached (DeepSeek's kv_a_layernorm; the
      DeepSeek-V3 export needs it).
    - `qk_norm`: per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3). A key norm is one scalar per
      token and kv head, 1/RMS(raw key), times a gain per dim: the gain is folded into the key weights (the latent
      and rope keys are fitted to gain-scaled raw keys), and the scalar, computed from the layer's raw key
      projection (`k_scale`), is cached per layer and kv head and multiplies that head's scores. So every plan
      stays exact in how it normalizes keys. Queries are normed per head as the source does, then mapped into the
      plan's query dims by a per-head matrix (`q_map`).
    - `source_name`, `source_kv_bytes_per_token`: what the model was converted from and its 16-bit KV figure.
    """

    model_type = "clla"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 16,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rope_inv_freq: list[float] | None = None,
        rope_attention_scaling: float = 1.0,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        softmax_scale: float | None = None,
        layer_windows: list[int | None] | None = None,
        layer_groups: list[list[int]] | None = None,
        kv_latent_dim: int | None = None,
        qk_nope_dim: int = 0,
        rope_dim: int | None = None,
        rope_heads: int | None = None,
        rope_freq_index: list[list[list[int]]] | None = None,
        kv_bits: int = 16,
        kv_quant_group: int = 32,
        kv_tail_dim: int = 0,
        kv_tail_bits: int = 2,
        kv_latent_dims: list[int] | None = None,
        kv_tail_dims: list[int] | None = None,
        rope_bits: int = 16,
        rope_from_latent: bool = False,
        qk_norm: bool = False,
        embed_scale: float = 1.0,
        sandwich_norms: bool = False,
        latent_norm: bool = False,
        source_name: str | None = None,
        source_model_type: str | None = None,
        source_kv_bytes_per_token: int | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        """One argument and one assignment per field, as transformers configs are written (hence its length); the
        defaults describe the identity plan of a tiny model."""
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        half = head_dim // 2
        # Default RoPE: theta 10000 over the full head dim (what Llama uses).
        self.rope_inv_freq = list(rope_inv_freq) if rope_inv_freq is not None else [
            1.0 / (10000.0 ** (2 * i / head_dim)) for i in range(half)
        ]
        self.rope_attention_scaling = rope_attention_scaling
        self.qkv_bias = qkv_bias
        self.o_bias = o_bias
        self.mlp_bias = mlp_bias
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.layer_windows = list(layer_windows) if layer_windows is not None else [None] * num_hidden_layers
        # Defaults describe the identity plan: one layer per group, values in the latent, all of the key in RoPE.
        self.layer_groups = [list(g) for g in layer_groups] if layer_groups is not None else [
            [i] for i in range(num_hidden_layers)
        ]
        self.rope_dim = rope_dim if rope_dim is not None else head_dim
        self.rope_heads = rope_heads if rope_heads is not None else num_key_value_heads
        self.qk_nope_dim = qk_nope_dim
        self.kv_latent_dim = kv_latent_dim if kv_latent_dim is not None else num_key_value_heads * (
            head_dim + qk_nope_dim
        )
        self.rope_freq_index = (
            [[list(f) for f in heads] for heads in rope_freq_index]
            if rope_freq_index is not None
            else [[list(range(self.rope_dim // 2)) for _ in range(self.rope_heads)] for _ in self.layer_groups]
        )
        self.kv_bits = kv_bits
        self.kv_quant_group = kv_quant_group
        self.kv_tail_dim = kv_tail_dim
        self.kv_tail_bits = kv_tail_bits
        n = len(self.layer_groups)
        self.kv_latent_dims = list(kv_latent_dims) if kv_latent_dims is not None else [self.kv_latent_dim] * n
        self.kv_tail_dims = list(kv_tail_dims) if kv_tail_dims is not None else [kv_tail_dim] * n
        if kv_latent_dims is not None and len(self.kv_latent_dims) == n:
            self.kv_latent_dim = max(self.kv_latent_dims)
        if kv_tail_dims is not None and len(self.kv_tail_dims) == n:
            self.kv_tail_dim = max(self.kv_tail_dims)
        self.rope_bits = rope_bits
        self.rope_from_latent = rope_from_latent
        self.qk_norm = qk_norm
        self.embed_scale = embed_scale
        self.sandwich_norms = sandwich_norms
        self.latent_norm = latent_norm
        self.source_name = source_name
        self.source_model_type = source_model_type
        self.source_kv_bytes_per_token = source_kv_bytes_per_token
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_plan()

    # ------------------------------------------------------------------ plan checks
    def validate_plan(self) -> None:
        """Raise ValueError naming the first inconsistency of the plan."""
        L = self.num_hidden_layers
        flat = [i for g in self.layer_groups for i in g]
        if flat != list(range(L)):
            raise ValueError(f"layer_groups must cover layers 0..{L - 1} once, in order, got {self.layer_groups}")
        for g in self.layer_groups:
            if not g or g != list(range(g[0], g[0] + len(g))):
                raise ValueError(f"each layer group must be a non-empty run of consecutive layers, got {g}")
        if len(self.layer_windows) != L:
            raise ValueError(f"layer_windows needs {L} entries, got {len(self.layer_windows)}")
        if self.kv_bits not in SUPPORTED_KV_BITS:
            raise ValueError(f"kv_bits must be one of {SUPPORTED_KV_BITS}, got {self.kv_bits}")
        n = len(self.layer_groups)
        if len(self.kv_latent_dims) != n or len(self.kv_tail_dims) != n:
            raise ValueError(f"kv_latent_dims and kv_tail_dims need one entry per layer group ({n}), got "
                             f"{len(self.kv_latent_dims)} and {len(self.kv_tail_dims)}")
        if any(t and not (self.kv_tail_bits in SUPPORTED_KV_BITS and self.kv_tail_bits < self.kv_bits)
               for t in self.kv_tail_dims):
            raise ValueError(f"kv_tail_bits must be one of {SUPPORTED_KV_BITS} below kv_bits ({self.kv_bits}), "
                             f"got {self.kv_tail_bits}")
        for g, (width, tail) in enumerate(zip(self.kv_latent_dims, self.kv_tail_dims)):
            at = f" (layer group {g})" if self.uneven_latent else ""
            if width < 1:
                raise ValueError(f"kv_latent_dim must be positive, got {width}{at}")
            if tail and not 0 < tail < width:
                raise ValueError(f"kv_tail_dim must lie between 0 and kv_latent_dim ({width}), got {tail}{at}")
            for w, bits in self.group_segments(g):
                if bits < 16 and w % self.kv_quant_group:
                    raise ValueError(f"each latent segment ({w} dims at {bits} bits) must be a multiple of "
                                     f"kv_quant_group {self.kv_quant_group}{at}")
                if bits < 8 and self.kv_quant_group % (8 // bits):
                    raise ValueError(f"kv_quant_group must be a multiple of {8 // bits} at {bits} bits "
                                     f"({8 // bits} values per byte)")
        if self.rope_dim % 2 or self.rope_dim < 0:
            raise ValueError(f"rope_dim must be even and non-negative, got {self.rope_dim}")
        H = self.num_attention_heads
        if self.rope_dim and (self.rope_heads < 1 or H % self.rope_heads):
            raise ValueError(f"rope_heads ({self.rope_heads}) must divide num_attention_heads ({H})")
        if H % self.num_key_value_heads:
            raise ValueError("num_key_value_heads must divide num_attention_heads")
        if self.rope_bits not in SUPPORTED_KV_BITS:
            raise ValueError(f"rope_bits must be one of {SUPPORTED_KV_BITS}, got {self.rope_bits}")
        if self.rope_bits < 8 and self.rope_dim and self.rope_quant_group % (8 // self.rope_bits):
            raise ValueError(f"rope_bits {self.rope_bits} needs a rope quant group (gcd of rope_dim and "
                             f"kv_quant_group) that is a multiple of {8 // self.rope_bits}")
        heads = self.rope_freq_index
        if self.rope_dim and (
            len(heads) != len(self.layer_groups)
            or any(len(h) != self.rope_heads for h in heads)
            or any(len(f) != self.rope_dim // 2 for h in heads for f in h)
            or any(not 0 <= i < len(self.rope_inv_freq) for h in heads for f in h for i in f)
        ):
            raise ValueError(
                "rope_freq_index needs, per layer group, rope_heads lists of rope_dim/2 valid frequency indices"
            )
        if self.rope_from_latent and (not self.rope_dim or self.rope_bits != 16):
            raise ValueError("rope_from_latent needs rope keys (rope_dim > 0) and leaves rope_bits at 16 (nothing "
                             f"separate is cached), got rope_dim {self.rope_dim}, rope_bits {self.rope_bits}")
        if self.qk_nope_dim + self.rope_dim < 1:
            raise ValueError("queries need at least one dim (qk_nope_dim + rope_dim)")

    def group_segments(self, g: int) -> list[tuple[int, int]]:
        """Layer group g's latent as stored: [(width, bits)], its head then (with a tail) its tail."""
        return latent_segments(self.kv_latent_dims[g], self.kv_bits, self.kv_tail_dims[g], self.kv_tail_bits)

    @property
    def uneven_latent(self) -> bool:
        """Whether layer groups store latents of different widths or tails."""
        return len(set(zip(self.kv_latent_dims, self.kv_tail_dims))) > 1

    def describe_latent(self) -> str:
        """See the function `describe_latent`."""
        return describe_latent([self.group_segments(g) for g in range(self.num_layer_groups)])

    @property
    def rope_quant_group(self) -> int:
        return rope_quant_group(self.rope_dim, self.kv_quant_group)

    @property
    def num_layer_groups(self) -> int:
        return len(self.layer_groups)

    def group_of_layer(self) -> list[int]:
        """layer index -> group index."""
        return [g for g, layers in enumerate(self.layer_groups) for _ in layers]


def latent_segments(width: int, bits: int, tail_dim: int, tail_bits: int) -> list[tuple[int, int]]:
    """A latent's stored segments, in order: [(width, bits)], the head then (with a tail) the tail."""
    return [(width - tail_dim, bits), (tail_dim, tail_bits)] if tail_dim else [(width, bits)]


def describe_latent(segments: list[list[tuple[int, int]]]) -> str:
    """A latent as stored, from each layer group's segments: e.g. "64 @ 4 + 96 @ 2 bit"; where groups differ, each
    segment's range of widths over the groups, e.g. "32–128 @ 4 + 0–96 @ 2 bit, per layer group"."""
    parts = []
    for bits in dict.fromkeys(b for seg in segments for _, b in seg):
        widths = [dict((b, w) for w, b in seg).get(bits, 0) for seg in segments]
        lo, hi = min(widths), max(widths)
        parts.append(f"{lo}–{hi} @ {bits}" if lo != hi else f"{hi} @ {bits}")
    uneven = len({tuple(seg) for seg in segments}) > 1
    return " + ".join(parts) + " bit" + (", per layer group" if uneven else "")


def rope_quant_group(rope_dim: int, quant_group: int) -> int:
    """Dims of a rope head that share one fp16 scale and zero-point: gcd(rope_dim, quant_group) (1 without rope)."""
    return math.gcd(rope_dim, quant_group) if rope_dim else 1


def source_kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """A standard 16-bit KV cache: keys and values of every kv head of every layer."""
    return num_layers * 2 * num_kv_heads * head_dim * CACHE_ELEMENT_BYTES_16


def cached_bytes(
    groups: int, segments: list[tuple[int, int]], quant_group: int, rope_heads: int, rope_dim: int, rope_bits: int,
    key_norms: int,
) -> dict[str, int]:
    """Bytes per token of each cached tensor, from what they depend on: `groups` layer groups, each caching a latent
    stored in `segments` [(width, bits), ...] quantized in groups of `quant_group` values, and `rope_heads` rope
    keys of `rope_dim` dims at `rope_bits` (rope_dim 0: none cached); `key_norms` 16-bit key norms per token.

    latent: each latent segment's values at its bits (packed 8 // bits per byte below 8 bits); latent_scales: an
    fp16 scale and an fp16 zero-point per quant_group values of each quantized segment; rope_keys: rope_heads ×
    rope_dim values at rope_bits; rope_scales: an fp16 scale and zero-point per `rope_quant_group` values (only
    below 16 bits); key_scales: the key norms.
    """
    latent = groups * sum(math.ceil(w * bits / 8) for w, bits in segments)
    scales = groups * sum((w // quant_group) * 2 * SCALE_BYTES for w, bits in segments if bits < 16)
    rope = groups * rope_heads * rope_dim * rope_bits // 8
    rope_groups = rope_heads * rope_dim // rope_quant_group(rope_dim, quant_group)
    rope_scales = groups * rope_groups * 2 * SCALE_BYTES if rope_bits < 16 else 0
    return {"latent": latent, "latent_scales": scales, "rope_keys": rope, "rope_scales": rope_scales,
            "key_scales": key_norms * CACHE_ELEMENT_BYTES_16}


def key_norm_count(config: CllaConfig) -> int:
    """Key norms cached per token: one per layer and kv head with qk_norm (see CllaConfig), else none."""
    return config.num_hidden_layers * config.num_key_value_heads if config.qk_norm else 0


def group_breakdowns(config: CllaConfig) -> list[dict[str, int]]:
    """Per layer group, bytes per token of each tensor it caches (`cached_bytes`; key norms excluded). With
    rope_from_latent no rope keys are cached."""
    cached_rope_dim = 0 if config.rope_from_latent else config.rope_dim
    return [cached_bytes(1, config.group_segments(g), config.kv_quant_group, config.rope_heads, cached_rope_dim,
                         config.rope_bits, 0) for g in range(config.num_layer_groups)]


def kv_bytes_breakdown(config: CllaConfig) -> dict[str, int]:
    """Bytes per token of each cached tensor, summed over layer groups (what the runtime allocates per token): see
    `cached_bytes`."""
    total = {k: sum(parts[k] for parts in group_breakdowns(config)) for k in group_breakdowns(config)[0]}
    return total | {"key_scales": key_norm_count(config) * CACHE_ELEMENT_BYTES_16}


def kv_bytes_per_token(config: CllaConfig) -> int:
    return sum(kv_bytes_breakdown(config).values())


RING_CHUNK = 1024  # the runtime's default: the most tokens one prefill step appends to a sliding-window ring
MAX_PLAN_CONTEXT = 32768  # convert's default --context (the row length a --kv-ratio means): the positions, at most this


def default_plan_context(config) -> int:
    """convert's default --context: the model's positions, at most MAX_PLAN_CONTEXT."""
    return min(config.max_position_embeddings, MAX_PLAN_CONTEXT)


def group_window(config: CllaConfig, g: int) -> int | None:
    """The sliding window layer group g's cache must cover: its layers' largest; None if one attends fully."""
    windows = [config.layer_windows[i] for i in config.layer_groups[g]]
    return None if any(w is None for w in windows) else max(windows)


def cache_slots(config: CllaConfig, context: int, ring_chunk: int | None) -> list[int]:
    """Slots per layer group for `context` tokens per row. Full-attention groups keep every token; with
    `ring_chunk` (the most tokens one prefill step appends), a sliding-window group keeps a ring of its window +
    ring_chunk - 1 slots (a step's queries reach back a window from each of its tokens), token p in slot p % size."""
    return layout_slots(config.layer_windows, config.layer_groups, context, ring_chunk)


def layout_slots(layer_windows: list[int | None], groups, context: int, ring_chunk: int | None) -> list[int]:
    """cache_slots for any layer layout `groups` over layers with these sliding windows (None: full attention)."""
    out = []
    for g in groups:
        windows = [layer_windows[i] for i in g]
        full = ring_chunk is None or any(w is None for w in windows)
        out.append(context if full else min(context, max(windows) + ring_chunk - 1))
    return out


def source_kv_bytes(config: CllaConfig, context: int) -> int:
    """One row of the source's 16-bit K/V cache at `context` tokens; a sliding-window layer keeps its window (as
    transformers' sliding-window caches do)."""
    per_layer = (config.source_kv_bytes_per_token or kv_bytes_per_token(config)) // config.num_hidden_layers
    return per_layer * sum(window_tokens(config, context))


def group_and_layer_bytes(config: CllaConfig) -> tuple[list[int], int]:
    """kv_bytes_breakdown split by owner: bytes per token of each layer group's streams (latent, rope keys and their
    scales) and of one layer's key norms (0 without qk_norm)."""
    per_group = [sum(parts.values()) for parts in group_breakdowns(config)]
    return per_group, kv_bytes_breakdown(config)["key_scales"] // config.num_hidden_layers


def window_tokens(config: CllaConfig, context: int) -> list[int]:
    """Per layer, the tokens of a `context`-token row that its attention reads: all, or its sliding window."""
    return [context if w is None else min(context, w) for w in config.layer_windows]


def kv_bytes(config: CllaConfig, context: int, ring_chunk: int | None = None) -> int:
    """Bytes of KV cache one row of `context` tokens takes: kv_bytes_per_token per token, except that sliding-window
    groups kept as rings (`cache_slots`) hold only their ring."""
    per_group, per_layer = group_and_layer_bytes(config)
    return sum(n * (group + per_layer * len(layers))
               for n, group, layers in zip(cache_slots(config, context, ring_chunk), per_group, config.layer_groups))
