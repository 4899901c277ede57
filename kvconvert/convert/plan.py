"""The plan of a conversion (`Plan`), and planning: the plan that meets --kv-ratio with the least calibration error.

1. Enumerate plans: layer layouts (the two finest uniform ones that fit: groups of a and of b > a layers; then
   "prefix" layouts, the first 2 or 3 groups' worth of layers, or 1/8, 1/4 or 1/2 of them, in groups of 1 or a
   and the rest in groups of b, since early layers lose most when they share), rope heads (one shared head, or one
   per kv head for single-layer groups) and rope dims, latent and rope bits, quantization group, and where the rope
   keys live: cached beside the latent, or rope keys from the latent (every key dim of every kv head, or one shared
   rope key); the latent width is the largest the byte budget leaves. A 4-bit latent is also tried with a 2-bit
   tail: TAIL_SHARES of the all-4-bit width stay at 4 bits and the bytes left hold the widest 2-bit tail (the
   latent's low-energy dims).
2. Score each with a proxy built from calibration moments, in one unit (expected squared change of attention
   outputs, summed over layers): rotation loss of what becomes position-free, the latent regression error, and
   quantization noise (measured relative noise of the quantizer times the signal it quantizes).
3. Build the best few and measure KL(source || model) on held-out calibration tokens; the lowest KL wins.
Explicit overrides fix parts of the plan; a target no plan reaches is refused with the smallest reachable ratio.

Bytes are counted per row at a context (`context`; None: per token): a group of sliding-window layers costs its
runtime ring, not a slot per token, so where a model has such layers the budget at a long context buys far wider
latents than per token, and the ratio is the one a user serving that context sees (see source_bytes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from ..config import (RING_CHUNK, CllaConfig, cached_bytes, describe_latent, key_norm_count, kv_bytes, kv_bytes_per_token,
                      latent_segments, layout_slots, rope_quant_group, source_kv_bytes)
from ..errors import KvconvertError
from ..quant import fake_quantize
from .groups import Layout, describe_layout, layer_kinds, prefix_groups, prefix_length, uniform_groups
from .precision import forwards_in
from .rope import SharedRope
from .stats import output_sensitivity

if TYPE_CHECKING:  # build.py imports Plan from here
    from .build import Compressor

Log = Callable[[str], None]
GROUP_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30)
LATENT_BITS = (4, 8, 16)
ROPE_BITS = (4, 8, 16)
QUANT_GROUPS = (32, 64)
TAIL_BITS = 2
TAIL_SHARES = (1 / 3, 1 / 2, 2 / 3)  # of the all-4-bit latent width, kept at 4 bits before a 2-bit tail
KEY_WEIGHTS = (0.5, 0.25, 0.125)  # the keys' weight against the values in the latent fit, tried by choose_plan
MIN_LATENT = 32
PREFIX_SHARES = (1 / 8, 1 / 4, 1 / 2)  # of the layers, kept in the finer groups (see prefix_layouts)
DEEPSEEK_V3 = "deepseek-v3"
TARGETS = ("clla", DEEPSEEK_V3)
ROPE_KEYS = ("cached", "latent", "auto")


@dataclass(frozen=True)
class Plan:
    """What a compressed model caches and how it is fitted; `to_config` gives its CllaConfig (field by field:
    latent_dim is kv_latent_dim, quant_group kv_quant_group, tail_dim and tail_bits kv_tail_dim and kv_tail_bits)."""

    groups: Layout
    latent_dim: int
    rope_dim: int
    kv_bits: int
    rope_bits: int = 16
    rope_heads: int = 1  # 1: one rope head shared by all heads and layers of a group; else num_key_value_heads
    quant_group: int = 32
    tail_dim: int = 0  # the latent's last (lowest-energy) dims stored at tail_bits (see CllaConfig.kv_tail_dim)
    tail_bits: int = 2
    rotate: bool = True  # orthogonal rotation of the latent before quantization
    activation_aware: bool = True  # False: plain weight SVD (ablation)
    select_rope: bool = True  # False: keep the highest frequencies, as plain partial RoPE would (ablation)
    equalize_rope: bool = True  # balance rope-key pairs against their queries (see rope_scale) before quantization
    latent_norm: bool = False  # an RMSNorm on the latent (DeepSeek's kv_a_layernorm; gain set to the latent's RMS)
    rope_from_latent: bool = False  # rope keys from the latent: each layer's, not cached (CllaConfig)
    key_weight: float = 1.0  # the keys' weight against the values in the latent fit (see Compressor.blocks)
    sequential: bool = False  # each group refitted on the converted model's own input (kvconvert.convert.sequential)
    # per layer group (latent width, tail width), where groups differ (`water_fill`); None: latent_dim and tail_dim
    widths: tuple[tuple[int, int], ...] | None = None

    def describe(self) -> str:
        rope = f"rope {self.rope_heads}x{self.rope_dim} @ {self.rope_bits} bit"
        if self.rope_from_latent:
            rope = f"rope {self.rope_heads}x{self.rope_dim} from the latent"
        latent = describe_latent([self.group_segments(i) for i in range(len(self.groups))])
        keys = f", keys weighted {self.key_weight:g}x" if self.key_weight != 1 else ""
        keys += ", refitted in sequence" if self.sequential else ""
        return f"{describe_layout(self.groups)}, latent {latent}, {rope}, quant group {self.quant_group}{keys}"

    @property
    def latent_segments(self) -> list[tuple[int, int]]:
        """The latent's segments [(width, bits)] of every group, when they do not differ (else see group_segments)."""
        return latent_segments(self.latent_dim, self.kv_bits, self.tail_dim, self.tail_bits)

    def group_width(self, i: int) -> int:
        """The latent width of the plan's i-th layer group."""
        return self.latent_dim if self.widths is None else self.widths[i][0]

    def group_segments(self, i: int) -> list[tuple[int, int]]:
        """The i-th layer group's latent segments [(width, bits)] (see config.group_segments)."""
        if self.widths is None:
            return self.latent_segments
        return latent_segments(self.widths[i][0], self.kv_bits, self.widths[i][1], self.tail_bits)

    def kv_bytes(self, base: CllaConfig, context: int | None = None) -> int:
        """`plan_bytes(base, self, context)` without building (or validating) the config: the width search prices
        hundreds of plans, and building a CllaConfig for each costs about a sixth of the planning time."""
        cached_rope_dim = 0 if self.rope_from_latent else self.rope_dim
        norms = key_norm_count(base) // base.num_hidden_layers  # per layer
        tokens = group_tokens(base, self.groups, context)
        return sum(n * sum(cached_bytes(1, self.group_segments(i), self.quant_group, self.rope_heads, cached_rope_dim,
                                        self.rope_bits, norms * len(g)).values())
                   for i, (g, n) in enumerate(zip(self.groups, tokens)))

    def to_config(self, base: CllaConfig, freq: list | None = None) -> CllaConfig:
        """The CllaConfig of this plan on a source (`base`: its identity config); raises ValueError if the plan does
        not fit the source. Without `freq` (per group and rope head, the kept RoPE frequency indices) the rope
        frequencies are placeholders: enough for shapes and byte counts."""
        b = base.to_dict()
        for k in ("model_type", "transformers_version", "architectures"):
            b.pop(k, None)
        shared = self.rope_heads == 1
        b.update(
            layer_groups=[list(g) for g in self.groups],
            kv_latent_dim=self.latent_dim,
            qk_nope_dim=base.head_dim if shared else base.head_dim - self.rope_dim,
            rope_dim=self.rope_dim,
            rope_heads=self.rope_heads,
            rope_freq_index=freq,
            kv_bits=self.kv_bits,
            rope_bits=self.rope_bits,
            kv_quant_group=self.quant_group,
            kv_tail_dim=self.tail_dim,
            kv_tail_bits=self.tail_bits,
            latent_norm=self.latent_norm,
            rope_from_latent=self.rope_from_latent,
            kv_latent_dims=None if self.widths is None else [w for w, _ in self.widths],
            kv_tail_dims=None if self.widths is None else [t for _, t in self.widths],
        )
        return CllaConfig(**b)


def fit_target(base: CllaConfig, ov: Overrides) -> Overrides:
    """The overrides a --target implies (refusing those that contradict it, and sources it cannot express)."""
    if ov.target in (None, "clla"):
        return ov
    if ov.target != DEEPSEEK_V3:
        raise KvconvertError(f"--target must be one of {', '.join(TARGETS)}; got {ov.target}")
    from .deepseek import source_reasons

    reasons = source_reasons(base)
    if reasons:
        raise KvconvertError(f"--target deepseek-v3: this source cannot be expressed: {'; '.join(reasons)}")
    forced = dict(group_size=1, rope_heads=1, kv_bits=16, rope_bits=16, tail_dim=0, rope_keys="cached")
    for name, value in forced.items():
        given = getattr(ov, name)
        if given is not None and given != value:
            flag = {"tail_dim": "--kv-tail-dim"}.get(name, "--" + name.replace("_", "-"))
            raise KvconvertError(f"--target deepseek-v3 fixes {flag} {value} (one latent per layer, one shared rope "
                                 f"key, a 16-bit cache); got {flag} {given}")
    if ov.groups is not None and any(len(g) != 1 for g in ov.groups):
        raise KvconvertError("--target deepseek-v3 needs one layer per group (--groups 1,1,...)")
    if ov.rope_dim is not None and (ov.rope_dim < 4 or ov.rope_dim % 2):
        raise KvconvertError(f"--target deepseek-v3 needs a rope key of at least 4 dims (even); got --rope-dim {ov.rope_dim}")
    return replace(ov, **forced)


@dataclass
class Overrides:
    latent_dim: int | None = None
    group_size: int | None = None
    groups: Layout | None = None
    rope_dim: int | None = None
    rope_heads: int | None = None
    kv_bits: int | None = None
    rope_bits: int | None = None
    quant_group: int | None = None
    tail_dim: int | None = None  # 0: no tail; None: the planner decides
    rope_keys: str | None = None  # "cached", "latent" (rope_from_latent), "auto" (both); None: see rope_keys_mode
    target: str | None = None  # "deepseek-v3": plans the DeepSeek-V3 export can express (see fit_target)

    def any(self) -> bool:
        return any(v is not None for k, v in vars(self).items() if k not in ("target", "rope_keys"))


def rope_keys_mode(ov: Overrides) -> str:
    """Where the plans' rope keys live: as given, else rope keys from the latent (better at every ratio on SmolLM2:
    docs/results.md) unless the other options need cached ones (rope bits, no rope dims, the DeepSeek-V3 target)."""
    if ov.rope_keys is not None:
        return ov.rope_keys
    cached = ov.target == DEEPSEEK_V3 or ov.rope_dim == 0 or ov.rope_bits not in (None, 16)
    return "cached" if cached else "latent"


def group_tokens(base: CllaConfig, groups, context: int | None) -> list[int]:
    """Tokens each layer group caches for one row of `context` tokens: all, or the runtime's ring for a group of
    sliding-window layers (config.cache_slots); None: one each (bytes per token)."""
    if context is None:
        return [1] * len(groups)
    return layout_slots(base.layer_windows, groups, context, RING_CHUNK)


def source_bytes(base: CllaConfig, context: int | None) -> int:
    """The source's 16-bit cache: per token (context None), or one row of `context` tokens, a sliding-window layer
    holding its window."""
    return base.source_kv_bytes_per_token if context is None else source_kv_bytes(base, context)


def plan_bytes(base: CllaConfig, plan: Plan, context: int | None = None) -> int:
    """KV bytes of the plan's config (built, so an invalid plan raises ValueError): per token, or one row at
    `context` tokens with the runtime's rings (config.kv_bytes)."""
    cfg = plan.to_config(base)
    return kv_bytes_per_token(cfg) if context is None else kv_bytes(cfg, context, RING_CHUNK)


def _widest(base: CllaConfig, budget: int, at: Callable[[int], Plan], step: int, cap: int,
            context: int | None = None) -> int:
    """The largest n (a multiple of step, at most cap) with plan bytes(at(n)) <= budget; bytes are linear in n."""
    one = at(step).kv_bytes(base, context)
    per_step = at(2 * step).kv_bytes(base, context) - one
    n = (budget - (one - per_step)) // per_step
    return int(max(0, min(n * step, cap - cap % step)))


def full_width(base: CllaConfig, plan: Plan) -> int:
    """The latent is a linear function of the hidden state: wider than it, or than everything a group caches, is
    waste."""
    return min(max(map(len, plan.groups)) * 2 * base.num_key_value_heads * base.head_dim, base.hidden_size)


def widest_latent(base: CllaConfig, plan: Plan, budget: int, context: int | None = None) -> int:
    """The largest latent width (a multiple of the quant group, or of 8 at 16 bits) within `budget` bytes, capped
    at `full_width`; a tail (plan.tail_dim) stays as it is and the head widens."""
    step = plan.quant_group if plan.kv_bits < 16 or plan.tail_dim else 8
    t = plan.tail_dim
    return t + _widest(base, budget, lambda n: replace(plan, latent_dim=t + n), step, full_width(base, plan) - t,
                       context)


def tail_plans(base: CllaConfig, plan: Plan, budget: int, context: int | None = None) -> list[Plan]:
    """The 4-bit plan of the widest latent (width W) with a 2-bit tail instead: heads of TAIL_SHARES of W, each
    with the widest tail the budget leaves."""
    qg, out = plan.quant_group, []
    for share in TAIL_SHARES:
        head = int(plan.latent_dim * share) // qg * qg
        if head < qg:
            continue
        tail = _widest(base, budget, lambda n: replace(plan, latent_dim=head + n, tail_dim=n), qg,
                       full_width(base, plan) - head, context)
        if tail >= qg:
            out.append(replace(plan, latent_dim=head + tail, tail_dim=tail))
    return list(dict.fromkeys(out))


def head8_mix(base: CllaConfig, plan: Plan, budget: int | None, ov: Overrides, context: int | None = None
              ) -> Plan | None:
    """For an all-4-bit latent whose bits and tail were not given: its highest-energy quant group at 8 bits before
    a 4-bit tail as wide as the budget leaves (one step of the reverse water-filling that a rotated one-precision
    latent gives up), else None."""
    if plan.kv_bits != 4 or plan.tail_dim or budget is None or ov.kv_bits is not None or ov.tail_dim is not None:
        return None
    head = plan.quant_group
    mix = lambda n: replace(plan, kv_bits=8, tail_bits=4, latent_dim=head + n, tail_dim=n)  # noqa: E731
    tail = _widest(base, budget, mix, plan.quant_group, full_width(base, plan) - head, context)
    return mix(tail) if tail >= plan.quant_group else None


def group_error(fit, plan: Plan, segments: list[tuple[int, int]]) -> float:
    """The latent's part of a group's proxy error (see proxy_error) when it is stored in `segments`: the regression
    error of its width, and each segment's quantization noise on the energy of its dims."""
    err, lo = fit.error(sum(w for w, _ in segments)), 0
    for width, bits in segments:
        # Rope keys through the latent make one direction (the keys' mean) dominate: count the spread only there
        energy = fit.spread(lo, lo + width) if plan.rope_from_latent else fit.S2[lo : lo + width].sum().item()
        err += quantizer_noise(bits, plan.quant_group) * energy
        lo += width
    return err


def water_fill(comp: Compressor, plan: Plan, budget: int | None, ov: Overrides,
               weights: list[float] | None = None, keep: bool = True, context: int | None = None) -> Plan | None:
    """The plan's bits and layout with each group's latent as wide as its error earns (reverse water-filling across
    groups): from the plan's latents (`keep`; else from one quant group per group), quant groups of latent dims are
    added (at the tail's bits, or the head's without a tail) or promoted from the tail to the head's bits, each step
    the one that lowers the summed proxy error (each group's times `weights[g]`) most per byte, until the budget is
    spent. None where the widths are fixed (--latent-dim, --kv-tail-dim), nothing is left to move, or the result is
    the uniform plan."""
    if budget is None or ov.latent_dim is not None or ov.tail_dim is not None or ov.target == DEEPSEEK_V3:
        return None
    q, n = plan.quant_group, len(plan.groups)
    weights = weights or [1.0] * n
    fits = [comp.plan_fit(g, plan, weighted=False) for g in plan.groups]  # in the proxy's terms (proxy_error)
    two = bool(plan.tail_dim)
    base = comp.base
    cap = [min(len(g) * 2 * base.num_key_value_heads * base.head_dim, base.hidden_size, f.S2.numel()) // q
           for g, f in zip(plan.groups, fits)]  # quant groups a latent can use (see full_width)
    # per group: quant groups at the head's bits, at the tail's
    state = [[(plan.latent_dim - plan.tail_dim) // q, plan.tail_dim // q] if keep else [1, 0] for _ in range(n)]

    def segments(head: int, tail: int) -> list[tuple[int, int]]:
        return latent_segments(q * (head + tail), plan.kv_bits, q * tail, plan.tail_bits)

    def shaped(states) -> Plan:
        return replace(plan, widths=tuple((q * (h + t), q * t) for h, t in states))

    tokens = group_tokens(base, plan.groups, context)

    def cost(i: int, head: int, tail: int) -> tuple[float, int]:
        nbytes = tokens[i] * sum(cached_bytes(1, segments(head, tail), q, 0, 0, 16, 0).values())
        return weights[i] * group_error(fits[i], plan, segments(head, tail)), nbytes

    spent = shaped(state).kv_bytes(base, context)
    if spent > budget:
        return None
    now = [cost(i, *s) for i, s in enumerate(state)]
    while True:
        best = None
        for i, (head, tail) in enumerate(state):
            moves = []
            if head + tail < cap[i]:
                moves.append([head, tail + 1] if two else [head + 1, tail])
                if two and tail == 0:
                    moves.append([head + 1, tail])
            if two and tail:
                moves.append([head + 1, tail - 1])
            for move in moves:
                err, nbytes = cost(i, *move)
                extra = nbytes - now[i][1]
                if extra <= 0 or spent + extra > budget or err >= now[i][0]:
                    continue
                gain = (now[i][0] - err) / extra
                if best is None or gain > best[0]:
                    best = (gain, i, move, (err, nbytes), extra)
        if best is None:
            break
        _, i, move, now[i], extra = best
        state[i] = move
        spent += extra
    out = shaped(state)
    if len(set(out.widths)) == 1:
        return None
    return out


def layouts(base: CllaConfig, ov: Overrides) -> list[Layout]:
    """Layer layouts to try: groups of each size, never across layer kinds (sliding vs global, see layer_kinds)."""
    if ov.groups is not None:
        return [ov.groups]
    L = base.num_hidden_layers
    sizes = [ov.group_size] if ov.group_size else [g for g in GROUP_SIZES if g <= L]
    found = []
    for g in sizes:
        layout = uniform_groups(L, g, layer_kinds(base))
        if layout not in found:
            found.append(layout)
    return found


def prefix_layouts(base: CllaConfig, a: int, b: int) -> list[Layout]:
    """Layouts between the uniform ones of a- and b-layer groups: the first m layers in groups of f (f = 1 or a),
    the rest in groups of b, for m = 2f, 3f and the shares PREFIX_SHARES of the layers. What a pair of adjacent
    layers loses by sharing a latent varies by more than an order of magnitude across the model and is largest in
    the first layers (SmolLM2: bench/studies/layer_sharing.py), which a first-order proxy does not see (it counts
    every layer's attention-output error alike): held-out KL judges these (choose_plan builds, per f, latent
    width, bits and rope option, the one with the longest prefix, and none whose latent is under half the uniform
    layouts' widest)."""
    L, kinds, out = base.num_hidden_layers, layer_kinds(base), []
    taken = [uniform_groups(L, a, kinds), uniform_groups(L, b, kinds)]
    for f in dict.fromkeys((1, a)):
        for m in sorted({2 * f, 3 * f, *(max(f, round(L * share / f) * f) for share in PREFIX_SHARES)}):
            layout = prefix_groups(L, f, b, m, kinds)
            if m < L and layout not in out + taken:
                out.append(layout)
    return out


def rope_options(base: CllaConfig, groups, ov: Overrides, from_latent: bool = False) -> list[tuple[int, int]]:
    """(rope heads, rope dim) pairs to try. Cached rope keys: one rope head shared by every kv head (and layer) of a
    group with all or half of the frequency pairs, and for single-layer groups one rope head per kv head with every
    pair. Rope keys from the latent: every pair of every kv head (each layer its own keys), or one shared head."""
    K, D = base.num_key_value_heads, base.head_dim
    single = all(len(g) == 1 for g in groups)
    if from_latent:
        options = [(K, D), (1, D)]
    else:
        options = [(1, D), (1, D // 2 - (D // 2) % 2)] + ([(K, D)] if single and K > 1 else [])
    if ov.rope_heads is not None:
        options = [(ov.rope_heads, rd) for _, rd in options if ov.rope_heads == 1 or single or from_latent]
    if ov.rope_dim is not None:
        options = [(rh, ov.rope_dim) for rh, _ in options]
    return sorted(set((rh, rd) for rh, rd in options if rd >= 0))


def enumerate_plans(base: CllaConfig, budget: int | None, ov: Overrides, max_layouts: int | None = None,
                    context: int | None = None) -> list[Plan]:
    """Plans the grid and the overrides allow within the budget. Without a budget (`smallest_ratio`), each plan at
    its narrowest latent: MIN_LATENT rounded up to the quant group (plus any tail), within `full_width`. With
    `max_layouts`, only the that many finest layer layouts that fit the budget: sharing across layers costs
    quality zero-shot."""
    plans, used = [], 0
    where = {"cached": [False], "latent": [True], "auto": [False, True]}[rope_keys_mode(ov)]
    for groups in layouts(base, ov):
        found = False
        for from_latent, (rh, rd) in [(f, o) for f in where for o in rope_options(base, groups, ov, f)]:
            if from_latent and not rd:
                continue
            for kb in [ov.kv_bits] if ov.kv_bits else LATENT_BITS:
                for rb in [16] if from_latent else [ov.rope_bits] if ov.rope_bits else ROPE_BITS:
                    for qg in [ov.quant_group] if ov.quant_group else QUANT_GROUPS:
                        tail = ov.tail_dim or 0
                        if kb == 16 and rb == 16 and not tail and qg != QUANT_GROUPS[0] and not ov.quant_group:
                            continue  # nothing is quantized: the quant group does not matter
                        step = qg if kb < 16 or tail else 8
                        narrowest = tail + -(-MIN_LATENT // step) * step
                        plan = Plan(groups, ov.latent_dim or narrowest, rd, kb, rb, rh, qg, tail, TAIL_BITS,
                                    rope_from_latent=from_latent)
                        if ov.target == DEEPSEEK_V3:  # standard RoPE frequencies (the highest), a normed latent
                            plan = replace(plan, select_rope=False, latent_norm=True)
                        if ov.latent_dim is None and budget is None and narrowest > full_width(base, plan):
                            continue
                        candidates = [plan]
                        if ov.latent_dim is None and budget is not None:
                            R = widest_latent(base, plan, budget, context)
                            if R < MIN_LATENT or R <= tail:
                                continue
                            candidates = [replace(plan, latent_dim=R)]
                            if kb == 4 and ov.tail_dim is None and ov.target != DEEPSEEK_V3:
                                candidates += tail_plans(base, candidates[0], budget, context)
                        for p in candidates:
                            try:
                                nbytes = plan_bytes(base, p, context)
                            except ValueError:
                                continue
                            if budget is None or nbytes <= budget:
                                plans.append(p)
                                found = True
        used += found
        if max_layouts is not None and used >= max_layouts:
            break
    return plans


def smallest_ratio(base: CllaConfig, ov: Overrides, context: int | None = None) -> float:
    """The smallest KV ratio any plan of the grid reaches (honouring the overrides), per token or at `context`."""
    plans = enumerate_plans(base, None, ov)
    return min(plan_bytes(base, p, context) for p in plans) / source_bytes(base, context) if plans else math.inf


@functools.lru_cache(maxsize=None)
def quantizer_noise(bits: int, group: int) -> float:
    """Relative MSE of the group-wise quantizer on Gaussian data (what a rotated latent looks like)."""
    if bits >= 16:
        return 0.0
    x = torch.randn(4096, group * max(1, 128 // group), generator=torch.Generator().manual_seed(0))  # whole groups
    return ((fake_quantize(x, bits, group) - x).pow(2).mean() / x.pow(2).mean()).item()


def proxy_error(comp: Compressor, plan: Plan) -> float:
    """Expected squared attention-output change summed over layers (see the module docstring), with every
    calibration token alike: the plans are built from fits that weigh tokens by the attention they receive
    (Compressor.fit_cov), but in those terms the few most-read tokens' quantization noise outweighs every width's
    regression error, and the proxy would rank narrow 8-bit latents over the 4-bit ones the held-out judge prefers
    (at 0.25 on SmolLM2: 160 @ 8 bit, held-out KL 0.24, over 288 @ 4 bit)."""
    return proxy_errors(comp, [plan])[0]


def proxy_fit_key(plan: Plan, group: tuple[int, ...]) -> tuple:
    """What the proxy's latent fit of `group` under `plan` depends on (Compressor.latent_fit's arguments)."""
    return (group, plan.rope_dim, plan.select_rope, plan.activation_aware, plan.rope_heads, plan.rope_from_latent,
            plan.key_weight)


def proxy_errors(comp: Compressor, plans: list[Plan]) -> list[float]:
    """proxy_error of each plan, with each distinct group fit made once: the plans' terms are gathered by the fit
    they read and computed fit by fit, then summed per plan in its groups' order (the same sums as one plan at a
    time). Plans of different layouts share many groups (a prefix layout's single layers and pairs are the uniform
    layouts' own), and a fit cache of a tenth of the weights' bytes holds fewer fits than one layout has."""
    uses: dict[tuple, list[tuple[int, int]]] = {}
    for j, p in enumerate(plans):
        for i, g in enumerate(p.groups):
            uses.setdefault(proxy_fit_key(p, g), []).append((j, i))
    terms = [[0.0] * (2 * len(p.groups)) for p in plans]  # per plan: (latent, rope) per group, in group order
    for (g, *args), where in sorted(uses.items(), key=lambda kv: kv[0][0][0]):  # a first layer's fits share its C^-1/2
        with comp.transient_fits():
            fit = comp.latent_fit(g, *args, weighted=False)
            for j, i in where:
                plan = plans[j]
                terms[j][2 * i] = group_error(fit, plan, plan.group_segments(i))
                terms[j][2 * i + 1] = rope_term(comp.rope_choice(g, plan.rope_dim, plan.select_rope, plan.rope_heads),
                                                plan)
    out = []
    for t in terms:  # added in order, as one plan at a time does (not sum(): from Python 3.12 it compensates)
        err = 0.0
        for x in t:
            err += x
        out.append(err)
    return out


def rope_term(choice, plan: Plan) -> float:
    """The rope keys' part of a group's proxy error: what RoPE pair selection leaves out and the cached keys'
    quantization noise, or (rope keys from the latent) for a shared rope key, its position-free rest."""
    if not plan.rope_from_latent:
        noise = quantizer_noise(plan.rope_bits, rope_quant_group(plan.rope_dim, plan.quant_group))
        return choice.error + noise * choice.kept_energy
    if isinstance(choice, SharedRope):  # what stays position-free loses its rotation; rope keys per kv head
        return choice.error  # keep every pair and need no map onto the first layer: nothing lost
    return 0.0


KL_CHUNK = 32  # positions whose (rows, positions, vocab) log-probabilities are held at once


class HeadLogp:
    """Log-probabilities held as the last hidden states they come from, (..., T, hidden), and the LM head that maps
    them: indexing computes log_softmax(head(hidden[index])), so the (..., T, vocab) tensor is never held whole. For
    a vocabulary of 150k, 512 positions' log-probabilities take 0.3 GB; their hidden states take 2 MB."""

    def __init__(self, hidden: torch.Tensor, head: torch.nn.Module):
        self.hidden, self.head = hidden, head

    @classmethod
    @torch.no_grad()
    def of(cls, model, tokens: torch.Tensor, positions: torch.Tensor | None = None,
           dtype: torch.dtype = torch.float32) -> HeadLogp:
        """`model`'s log-probabilities after each of `tokens` (B, T), or, for one row, at `positions` only; the
        forward in `dtype` (precision.forwards_in), the LM head on the kept positions in the head's own dtype."""
        with forwards_in(dtype, model.lm_head.weight.device):
            hidden = model.model(tokens, use_cache=False)[0]  # the last hidden state (a CLLA or a transformers model)
        hidden = hidden.to(model.lm_head.weight.dtype)
        return cls(hidden if positions is None else hidden[0, positions], model.lm_head)

    def __getitem__(self, index) -> torch.Tensor:
        """log_softmax(head(hidden[index])): the hidden states' last axis stands where the vocabulary's will."""
        return F.log_softmax(self.head(self.hidden[index]).float(), -1)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.hidden.shape[:-1], self.head.out_features)

def kl_sum(ref, mine, length: int, chunk: int = KL_CHUNK) -> float:
    """Σ over positions (and rows) of KL(ref ‖ mine), log-probabilities (..., length, vocab) as tensors or
    HeadLogps, `chunk` positions at a time: each temporary of the whole would be the size of the logits."""
    total = 0.0
    for s in range(0, length, chunk):
        p, q = ref[..., s : s + chunk, :], mine[..., s : s + chunk, :]
        total += (p.exp() * (p - q)).sum().item()
    return total


@torch.no_grad()
def kl_to_source(model, tokens: torch.Tensor, source_logp, chunk: int = KL_CHUNK,
                 dtype: torch.dtype = torch.float32) -> float:
    """Mean KL(source ‖ model) per token of `tokens` (B, T); source_logp: the source's log-probabilities there, a
    (B, T, vocab) tensor or a HeadLogp; model's forward in `dtype` (HeadLogp.of)."""
    return kl_sum(source_logp, HeadLogp.of(model, tokens, dtype=dtype), tokens.shape[1], chunk) / tokens.numel()


@dataclass(frozen=True)
class RecallProbe:
    """Long held-out rows and, in each, the tokens only far context predicts: the copy of a row's start at its end
    ([A, filler, A]: easy for a model that can look back across the filler, hard for one that cannot), or the
    answers of a long-context trial. The KL to the source on those tokens measures long-range recall (copying and
    retrieval, what finding a needle rests on)."""

    tokens: torch.Tensor  # (P, L)
    mask: torch.Tensor  # (P, L) bool: the scored tokens (each predicted from the positions before it)

    @classmethod
    def build(cls, head: torch.Tensor, filler: torch.Tensor, length: int) -> RecallProbe | None:
        """One recall row from a held-out row `head` and calibration tokens `filler`, about `length` tokens; the second
        A is scored after its first token (None when the filler is too short for a probe of at least four rows)."""
        n = min(length - 2 * head.numel(), filler.numel())
        if n < 2 * head.numel():
            return None
        tokens = torch.cat([head.flatten(), filler.flatten()[:n], head.flatten()])[None]
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[0, tokens.shape[1] - head.numel() + 1 :] = True
        return cls(tokens, mask)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, long: torch.Tensor) -> RecallProbe:
        """From rows with far dependencies and their masks (kvconvert.distill.data.long_rows); rows with nothing to
        score are left out."""
        keep = long.any(1)
        return cls(rows[keep], long[keep])

    def row_logp(self, model, i: int, dtype: torch.dtype = torch.float32) -> HeadLogp:
        """The model's log-probabilities of row i's scored tokens (its forward in `dtype`)."""
        keep = self.mask[i, 1:].nonzero().flatten()  # the logits at position i predict token i + 1
        return HeadLogp.of(model, self.tokens[i, None], keep, dtype)

    @torch.no_grad()
    def logp(self, model, dtype: torch.dtype = torch.float32) -> list[HeadLogp]:
        """Per row, the model's log-probabilities of its scored tokens."""
        return [self.row_logp(model, i, dtype) for i in range(len(self.tokens))]

    def kl(self, model, source_logp: list[HeadLogp], dtype: torch.dtype = torch.float32) -> float:
        """KL(source ‖ model) over each row's scored tokens, averaged over the rows (source_logp: the source's `logp`)."""
        return self.kl_bound(model, source_logp, dtype=dtype)[0]

    @torch.no_grad()
    def kl_bound(self, model, source_logp: list[HeadLogp], stop_at: float = math.inf,
                 dtype: torch.dtype = torch.float32) -> tuple[float, bool]:
        """(KL, exact): `kl`, scoring the rows in turn and stopping once the rows scored put the mean at `stop_at` or
        above (every row's KL is ≥ 0), before another row; then (that lower bound, False), with no row scored where
        stop_at ≤ 0. A row costs a forward of the probe's length: the planner stops where a plan can no longer win."""
        total = 0.0
        for i, ref in enumerate(source_logp):
            if total / len(source_logp) >= stop_at:
                return total / len(source_logp), False
            total += kl_sum(ref, self.row_logp(model, i, dtype), len(ref)) / len(ref)
        return total / len(source_logp), True


def key_weight_search(best: tuple, judge: Callable[[float, float], tuple]) -> tuple:
    """The best of `best` (a judged plan, keys at full weight) and the plans judge(w, best score so far) for w in
    KEY_WEIGHTS, found by a line search from the middle weight: on to lighter ones while the score falls, else to
    heavier ones. Two judged plans where every weight would take three (or four on a finer grid); on SmolLM2 at 0.25
    and 0.10 the score was unimodal in the weight and the search picks what trying every weight picked
    (docs/results.md)."""
    weights = sorted(KEY_WEIGHTS, reverse=True)  # heavier to lighter
    i = len(weights) // 2
    r = judge(weights[i], best[0])
    step = 1 if r[0] < best[0] else -1
    if r[0] < best[0]:
        best = r
    i += step
    while 0 <= i < len(weights):
        r = judge(weights[i], best[0])
        if r[0] >= best[0]:
            break
        best, i = r, i + step
    return best


RECALL_FINALISTS = 3  # stage 1's best families by held-out KL that are also judged on the recall probe


@dataclass
class PlanReport:
    plan: Plan
    model: torch.nn.Module  # the chosen plan, already built (for the held-out check)
    kv_bytes: int
    kv_ratio: float
    heldout_kl: float
    candidates: list[dict] = field(default_factory=list)
    recall_kl: float | None = None  # on the RecallProbe, when there was one


def choose_plan(
    comp: Compressor, kv_ratio: float | None, ov: Overrides, heldout: torch.Tensor, per_family: int = 1,
    log: Log = lambda m: None, prefix: bool = True, probe: RecallProbe | None = None, refine: bool = True,
    sequential: bool = False, top_up: bool = False, context: int | None = None, dtype: torch.dtype = torch.float32,
) -> PlanReport:
    """Proxy-rank the plans of each (layout, rope heads, rope dim) family, then measure held-out KL on the best
    `per_family` of each; with a `probe` (long-range recall) the RECALL_FINALISTS best are also measured on it and the
    lowest sum wins, then is refined under the same sum.
    `prefix=False` leaves out the prefix layouts, `refine=False` the refinements of the winner (ablations),
    `sequential=True` adds its sequential refit (`kvconvert convert --refit`), `top_up=True` the bytes it leaves spent
    per layer group (`--top-up`). Bytes and the ratio are one row's at `context` tokens (None: per token). The
    judge's forwards (the source's and every judged plan's) run in `dtype` (convert/precision.py)."""
    base = comp.base
    src = source_bytes(base, context)
    budget = int(kv_ratio * src) if kv_ratio is not None else None
    if budget is None and ov.latent_dim is None:
        raise KvconvertError("give --kv-ratio, or --latent-dim with the other plan options")
    plans = enumerate_plans(base, budget, ov, max_layouts=2, context=context)
    uniform = list(dict.fromkeys(p.groups for p in plans))
    mixed = []
    if prefix and ov.groups is None and ov.group_size is None and len(uniform) == 2:
        a, b = (max(map(len, g)) for g in uniform)
        for layout in prefix_layouts(base, a, b):
            mixed += enumerate_plans(base, budget, replace(ov, groups=layout), context=context)
    if not plans:
        reach = smallest_ratio(base, ov, context)
        if kv_ratio is not None and kv_ratio < reach < math.inf:
            what = "with these plan options " if ov.any() else ""
            raise KvconvertError(f"--kv-ratio {kv_ratio:g} is out of reach {what}(smallest reachable ratio: {reach:.4f})")
        raise KvconvertError("the plan options contradict each other or the model's shapes (no valid plan)")

    proxies = dict(zip(map(id, plans + mixed), proxy_errors(comp, plans + mixed)))  # each group's fit made once

    def picks(candidates: list[Plan]) -> list[tuple[float, Plan]]:
        """The `per_family` lowest-proxy plans of each (layout, rope heads, rope dim) family."""
        families: dict = {}
        for p in candidates:
            families.setdefault((p.groups, p.rope_heads, p.rope_dim, p.rope_from_latent), []).append(p)
        out = []
        for members in families.values():
            out += sorted(((proxies[id(p)], p) for p in members), key=lambda t: t[0])[:per_family]
        return out

    chosen = picks(plans)
    widest = max((p.latent_dim for _, p in chosen), default=0)
    finest: dict = {}  # prefix layouts of one first-group size, width, bits and rope: the longest prefix
    for proxy, p in picks(mixed):
        if 2 * p.latent_dim < widest:
            continue  # a prefix that halves the uniform layouts' widest latent never measured better
        f = len(p.groups[0])
        key = (f, p.latent_dim, p.tail_dim, p.kv_bits, p.rope_bits, p.quant_group, p.rope_heads, p.rope_dim,
               p.rope_from_latent)
        if key not in finest or prefix_length(p.groups) > prefix_length(finest[key][1].groups):
            finest[key] = (proxy, p)
    chosen += finest.values()
    log(f"planning: {len(plans) + len(mixed)} plans, {len(chosen)} built")
    source_logp = HeadLogp.of(comp.src, heldout, dtype=dtype)
    probe_logp = probe.logp(comp.src, dtype) if probe is not None else None
    results: list[dict] = []

    def recall(p: Plan, model, kl: float, bound: float) -> float | None:
        """p's recall KL, or None where scoring the probe's rows stopped once held-out KL plus recall KL reached
        `bound`, the best score so far (lossless: p cannot win). Recorded in p's entry of the candidates."""
        rkl, exact = probe.kl_bound(model, probe_logp, bound - kl, dtype)
        entry = next(r for r in reversed(results) if r["plan"] == p.describe())
        if not exact:
            entry["recall_kl_at_least"] = rkl
            log(f"  {p.describe()}: recall KL ≥ {rkl:.4f}, cannot win (rows left unscored)")
            return None
        entry["recall_kl"] = rkl
        log(f"  {p.describe()}: recall KL {rkl:.4f}")
        return rkl

    def judge(p: Plan, proxy: float | None, bound: float | None = None) -> tuple:
        """Build p and measure it: (score, plan, model, held-out KL, recall KL or None); score = the sum. With a
        `bound` (the best score so far; math.inf for none) and a probe, p is also judged on recall; its score is
        math.inf where it cannot beat the bound (see `recall`)."""
        with comp.transient_fits():  # the judged plans are of different families: their fits are not reused
            model = comp.build(p)
        kl = kl_to_source(model, heldout, source_logp, dtype=dtype)
        ratio = plan_bytes(base, p, context) / src
        log(f"  {p.describe()}: KV ratio {ratio:.4f}, held-out KL {kl:.4f}")
        results.append({"plan": p.describe(), "kv_ratio": ratio, "proxy": proxy, "heldout_kl": kl, "recall_kl": None})
        if bound is None or probe is None:
            return kl, p, model, kl, None
        rkl = recall(p, model, kl, bound)
        return (math.inf if rkl is None else kl + rkl), p, model, kl, rkl

    # 1. the families' best plans, by held-out KL; the RECALL_FINALISTS best of them also by recall KL, and the
    #    lowest sum wins (a family can be close on short text and far apart at 2k tokens: layer sharing at 0.10)
    judged: list[tuple] = []  # the best RECALL_FINALISTS so far, models kept (one model is the source's size)
    for proxy, p in chosen:
        judged = sorted([*judged, judge(p, proxy)], key=lambda r: r[0])[: max(1, RECALL_FINALISTS)]
    best = judged[0]
    if probe is not None and refine:
        finalists: list[tuple] = []
        for _, p, model, kl, _ in judged[:RECALL_FINALISTS]:  # by held-out KL: the likeliest winner sets the bound
            rkl = recall(p, model, kl, min((f[0] for f in finalists), default=math.inf))
            finalists.append((math.inf if rkl is None else kl + rkl, p, model, kl, rkl))
        best = min(finalists, key=lambda r: r[0])
    # 2. refine the winner, by held-out KL plus recall KL: lighter keys in the fit (the weights come from a
    #    short-context model of the error; on SmolLM2 lighter keys cut both KLs: docs/results.md), then an 8-bit head
    if refine:
        winner = best[1]
        best = key_weight_search(best, lambda w, bound: judge(replace(winner, key_weight=w), None, bound))
    mixed8 = head8_mix(base, best[1], budget, ov, context) if refine else None
    if mixed8 is not None:
        r = judge(mixed8, None, best[0])
        if r[0] < best[0]:
            best = r
    # 3. the bytes the winner leaves unspent (its widths step in every group at once), given to the groups where
    #    the proxy error, in KL through the layers' measured sensitivity, falls most; judged on the recall probe only
    #    if it wins on held-out KL (docs/results.md, "Bytes per layer group")
    filled = None
    if refine and top_up and probe is not None:
        sens = output_sensitivity(comp.src, heldout)
        filled = water_fill(comp, best[1], budget, ov, [sum(sens[i] for i in g) / len(g) for g in best[1].groups],
                            context=context)
    if filled is not None:
        r = judge(filled, None)
        if r[3] < best[3]:
            rkl = recall(filled, r[2], r[3], best[0])
            if rkl is not None and r[3] + rkl < best[0]:
                best = (r[3] + rkl, *r[1:4], rkl)
    # 4. the winner refitted group by group on the converted model's own inputs (convert/sequential.py)
    if refine and sequential and best[1].activation_aware:
        r = judge(replace(best[1], sequential=True), None, best[0])
        if r[0] < best[0]:
            best = r
    _, plan, model, kl, recall = best
    nbytes = plan_bytes(base, plan, context)
    return PlanReport(plan, model, nbytes, nbytes / src, kl, results, recall)
