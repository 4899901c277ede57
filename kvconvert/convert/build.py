"""Build a compressed CllaForCausalLM for a plan: RoPE split, latent regression, rotation, weight assembly."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

try:
    from transformers.initialization import no_init_weights
except ImportError:  # older transformers: the random init runs (slower, same result)
    no_init_weights = nullcontext

from ..config import CllaConfig
from ..model import CllaForCausalLM
from .calibrate import Calibration
from .groups import layer_kinds
from .identity import identity_config, identity_state_dict, norm_gain
from .latent import Block, LatentFit, fit_latent, inverse_sqrt, rotation
from .plan import Plan
from .rope import RopeChoice, SharedRope, choose_rope, choose_shared_rope, complex_rows, fold_map_into_query, nope_dims, rope_dims
from .stats import LayerStats, layer_stats


FIT_CACHE_SHARE = 0.1  # see Compressor.transient_fits


def tensors(obj):
    """The tensors in obj (a tensor, a dataclass of them, or lists of those)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors(x)
    elif hasattr(obj, "__dataclass_fields__"):
        for f in obj.__dataclass_fields__:
            yield from tensors(getattr(obj, f))


def tensor_bytes(*objs) -> int:
    """The bytes of the tensors in objs, each storage counted once (a latent fit holds the C^-1/2 that is also
    cached on its own)."""
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for o in objs for t in tensors(o)}
    return sum(storages.values())


ATTENTION_WEIGHT = 0.5  # β: each calibration token weighs (1 - β) + β × the attention it receives in the fits


class Compressor:
    """Source + calibration -> compressed models. Per-group fits are cached so plans share work."""

    def __init__(self, source_model, model_type: str, source_name: str, cal: Calibration,
                 attention_weight: float = ATTENTION_WEIGHT):
        self.src = source_model
        self.attention_weight = attention_weight  # β of the fits' token weights (Calibration.weighted_cov)
        self.base = identity_config(source_model.config, model_type, source_name)
        self.cal = cal
        c = self.base
        self.H, self.K, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.h = c.hidden_size
        self.kinds = layer_kinds(c)
        layers = source_model.model.layers
        gain = (lambda norm: norm_gain(norm, c)) if c.qk_norm else None
        self.stats: list[LayerStats] = [layer_stats(layer, cal, i, self.H, self.K, self.D, gain, c.rms_norm_eps)
                                        for i, layer in enumerate(layers)]
        self._fits: dict = {}  # rope choices, latent fits and their C^-1/2, in the order last used
        # latent fits kept between the planner's steps: FIT_CACHE_SHARE of the source's weight bytes
        self.fit_cache_bytes = FIT_CACHE_SHARE * sum(p.numel() * p.element_size() for p in source_model.parameters())

    @contextmanager
    def transient_fits(self):
        """Within the block, every latent fit (and its C^-1/2) made is kept for reuse; at its end, only the most
        recently used ones within fit_cache_bytes are. A fit holds (h x h)-sized float64 matrices: kept for every
        family the planner ranks and builds, they took more memory than the weights of a model with a wide hidden
        size (docs/design.md, "Conversion memory"). The rope choices and the moments stay."""
        try:
            yield
        finally:
            fits = [k for k in self._fits if k[0] in ("latent", "Ci")]  # least recently used first
            while fits and tensor_bytes(*(self._fits[k] for k in fits)) > self.fit_cache_bytes:
                del self._fits[fits.pop(0)]

    def _cached(self, key):
        """The fit under `key`, now the most recently used, or None."""
        if key not in self._fits:
            return None
        self._fits[key] = self._fits.pop(key)
        return self._fits[key]

    # ------------------------------------------------------------------ per-group analysis
    def rope_choice(self, group: tuple[int, ...], rope_dim: int, select: bool = True, heads: int = 1) -> RopeChoice | SharedRope:
        key = ("rope", group, rope_dim, select, heads)
        if key not in self._fits:
            c = self.base
            off = self.freq_offset(group)
            inv_freq = c.rope_inv_freq[off : off + self.D // 2]
            args = (list(group), [self.stats[i] for i in group], self.cal, rope_dim, inv_freq, c.softmax_scale,
                    self.H, self.K, self.D)
            if heads == 1:
                choice = choose_shared_rope(*args, select)
            else:
                choice = choose_rope(*args)
                if not select:  # ablation: the highest-frequency pairs, as a fixed partial RoPE keeps
                    choice.freq = [list(range(rope_dim // 2)) for _ in range(self.K)]
            self._fits[key] = choice
        return self._fits[key]

    def freq_offset(self, group: tuple[int, ...]) -> int:
        """Where the group's RoPE frequencies start in the config's table (Gemma 3's sliding layers have their own
        base: see identity.source_rope). A group mixes no layer kinds (see groups.layer_kinds)."""
        offsets = {self.kinds[layer][1] for layer in group}
        if len(offsets) > 1:
            raise ValueError(f"layer group {list(group)} mixes layers of different RoPE bases")
        return offsets.pop()

    def rope_blocks(self, group: tuple[int, ...], choice) -> list[Block]:
        """rope_from_latent: the pre-RoPE rope keys as regression targets (kind "r"). A key error e in pair i moves a
        score by s·q_i·R e_i; averaged over the relative rotation R its mean square is s² E|q_i|² |e_i|² / 2, so each
        dim of pair i weighs s²/2 Σ_h vscale_h E|q_h,i|² (the queries that read it, through any folded map u).
        Shared rope key: one block on the first layer (every layer reads it); per kv head: each layer's own keys."""
        H, K, D, s = self.H, self.K, self.D, self.base.softmax_scale
        per = H // K
        out = []
        if isinstance(choice, SharedRope):
            w = torch.zeros(len(choice.freq), dtype=torch.float64)
            for j, l in enumerate(group):
                st = self.stats[l]
                for hq in range(H):
                    w += st.vscale[hq] * st.q_pair_energy[hq, choice.freq] * choice.u[j, hq // per, choice.freq].abs() ** 2
            return [Block(group[0], "r", 0, choice.ws, torch.diag(s**2 * w.repeat(2) / 2))]
        for l in group:
            st = self.stats[l]
            for k in range(K):
                keep = choice.freq[k]
                w = (st.vscale[k * per : (k + 1) * per, None] * st.q_pair_energy[k * per : (k + 1) * per][:, keep]).sum(0)
                rows = st.wk[[k * D + d for d in rope_dims(keep, D)]]
                out.append(Block(l, "r", k, rows, torch.diag(s**2 * w.repeat(2) / 2)))
        return out

    def blocks(self, group: tuple[int, ...], choice, activation_aware: bool = True, rope_from_latent: bool = False,
               key_weight: float = 1.0) -> list[Block]:
        """The regression targets of a group's latent: keys (k; with rope_from_latent also the rope keys, r) weighted
        by the squared score change a key error makes (times `key_weight`), values (v) by the squared output change."""
        H, K, D, s = self.H, self.K, self.D, self.base.softmax_scale
        per = H // K
        shared = isinstance(choice, SharedRope)
        out = self.rope_blocks(group, choice) if rope_from_latent else []
        for j, l in enumerate(group):
            st = self.stats[l]
            cov = self.cal.cov(l, l)
            for k in range(K):
                # shared rope: every key dim, as the residual after the shared rope key; else the dropped pairs
                dims = list(range(D)) if shared else nope_dims(choice.freq[k], D)
                if not dims:
                    continue
                rows = st.wk[[k * D + d for d in dims]]
                omega = torch.zeros(len(dims), len(dims), dtype=torch.float64)
                for h in range(k * per, (k + 1) * per):
                    q = st.wq[[h * D + d for d in dims]].double()
                    omega += st.vscale[h] * (q @ cov @ q.T)
                w_f = complex_rows(choice.u[j, k], choice.freq, choice.ws, D) if shared else None
                out.append(Block(l, "k", k, rows, s**2 * omega, w_f))
            for k in range(K):
                wo = st.wo[:, k * per * D : (k + 1) * per * D].double().reshape(-1, per, D)
                omega = torch.einsum("ahd,ahe->de", wo, wo)
                out.append(Block(l, "v", k, st.wv[k * D : (k + 1) * D], omega))
        if not activation_aware:  # ablation: plain weight SVD, as if inputs were white and outputs unweighted
            out = [Block(b.layer, b.kind, b.kv_head, b.w, torch.eye(b.w.shape[0], dtype=torch.float64), b.w_f) for b in out]
        if key_weight != 1:
            out = [Block(b.layer, b.kind, b.kv_head, b.w, b.omega * key_weight, b.w_f) if b.kind in "kr" else b
                   for b in out]
        return out

    def latent_fit(
        self, group: tuple[int, ...], rope_dim: int, select: bool = True, activation_aware: bool = True, heads: int = 1,
        rope_from_latent: bool = False, key_weight: float = 1.0, weighted: bool = True,
    ) -> LatentFit:
        """The group's latent, fitted on the source's inputs (cached); `weighted`: each token weighted by the attention
        it receives (fit_cov), else every token alike (what the planner's proxy ranks plans by, see plan.proxy_error)."""
        key = ("latent", group, rope_dim, select, activation_aware, heads, rope_from_latent, key_weight, weighted)
        if self._cached(key) is None:
            blocks = self.blocks(group, self.rope_choice(group, rope_dim, select, heads), activation_aware, rope_from_latent,
                                 key_weight)
            if activation_aware:
                cov = self.fit_cov(group) if weighted else self.cal.cov
                ci_key = ("Ci", group, "weighted") if weighted else ("Ci", group[0])
                if self._cached(ci_key) is None:
                    self._fits[ci_key] = inverse_sqrt(cov(group[0], group[0])[: self.h, : self.h])
                self._fits[key] = fit_latent(blocks, cov, group[0], self._fits[ci_key])
            else:
                eye = torch.eye(self.h + 1, dtype=torch.float64)
                self._fits[key] = fit_latent(blocks, lambda i, j: eye, group[0])
        return self._fits[key]

    def plan_fit(self, group: tuple[int, ...], plan: Plan, inputs=None, weighted: bool = True) -> LatentFit:
        """The group's latent under the plan (`weighted`: see latent_fit); `inputs` (see latent.fit_latent): fitted on
        other inputs than the source's (not cached)."""
        if inputs is None or not plan.activation_aware:
            return self.latent_fit(group, plan.rope_dim, plan.select_rope, plan.activation_aware, plan.rope_heads,
                                   plan.rope_from_latent, plan.key_weight, weighted)
        blocks = self.blocks(group, self.rope_choice(group, plan.rope_dim, plan.select_rope, plan.rope_heads), True,
                             plan.rope_from_latent, plan.key_weight)
        return fit_latent(blocks, self.fit_cov(group) if weighted else self.cal.cov, group[0], inputs=inputs)

    def fit_cov(self, group: tuple[int, ...]):
        """The moments a group's latent is fitted on: each token weighted by the attention it receives in the group's
        layers (Calibration.weighted_cov; the plain moments with attention_weight 0)."""
        return self.cal.weighted_cov(tuple(group), self.attention_weight)

    def rope_scale(self, group: tuple[int, ...], choice, k: int) -> torch.Tensor:
        """(rope_dim, 1) per-pair scales s = (E|k|² / E|q|²)^(1/4): after k/s and q·s both sides carry equal
        energy, so the quantization noise of the key is not spent on pairs that queries barely read."""
        per = self.H // self.K
        if isinstance(choice, SharedRope):
            keep, m = choice.freq, len(choice.freq)
            k_e = ((choice.ws @ self.cal.cov(group[0], group[0])) * choice.ws).sum(1)
            k_e = k_e[:m] + k_e[m:]
            q_e = sum(
                (self.stats[l].q_pair_energy[:, keep] * (choice.u[j, torch.arange(self.H) // per][:, keep].abs() ** 2)).sum(0)
                for j, l in enumerate(group)
            )
        else:
            keep = choice.freq[k]
            k_e = self.stats[group[0]].k_pair_energy[k, keep]
            q_e = sum(self.stats[l].q_pair_energy[k * per : (k + 1) * per, keep].sum(0) for l in group)
        s = (k_e / q_e.clamp_min(1e-12)).clamp_min(1e-12) ** 0.25
        return s.repeat(2)[:, None]

    def query_rows(self, head: torch.Tensor, hq: int, j: int, choice, plan: Plan, scales: list[torch.Tensor]) -> torch.Tensor:
        """Query head hq of the group's j-th layer in the plan's dims, [q_nope | q_rope], as rows over what `head`
        (its D rows) is over: the source's augmented inputs, or (qk-norm sources) the normed query itself."""
        D = self.D
        k = hq // (self.H // self.K)
        if isinstance(choice, SharedRope):
            rows = [head]
            if plan.rope_dim:
                rows.append(fold_map_into_query(head, choice.freq, choice.u[j, k], D) * scales[0])
        else:  # a layer's own rope keys from the latent need no map onto the first layer's
            rows = [head[nope_dims(choice.freq[k], D)]]
            M = torch.ones(D // 2, dtype=torch.complex128) if plan.rope_from_latent else choice.maps[j][k]
            if plan.rope_dim:
                rows.append(fold_map_into_query(head, choice.freq[k], M, D) * scales[k])
        return torch.cat(rows)

    # ------------------------------------------------------------------ assembly
    def config(self, plan: Plan) -> CllaConfig:
        freq = []
        for g in plan.groups:
            c, off = self.rope_choice(g, plan.rope_dim, plan.select_rope, plan.rope_heads), self.freq_offset(g)
            freq.append([[i + off for i in f] for f in ([c.freq] if plan.rope_heads == 1 else c.freq)])
        return plan.to_config(self.base, freq)

    @torch.no_grad()
    def build(self, plan: Plan) -> CllaForCausalLM:
        """The model of `plan`; its parameters outside attention are the source's own tensors (see own_weights)."""
        cfg = self.config(plan)
        with no_init_weights():  # every weight is assigned below
            model = CllaForCausalLM(cfg)
        # Embeddings, norms, MLPs and output projections as the identity maps them; attention's own parts below
        sd = {k: v for k, v in identity_state_dict(self.src, self.base).items()
              if ".self_attn.o_proj." in k or not (".self_attn." in k or "latent_proj." in k)}
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight")
        for g, group in enumerate(plan.groups):
            sd |= self.group_weights(g, group, plan, cfg)
        dtype = next(self.src.parameters()).dtype
        # assign: the model takes these tensors as its parameters, so what it shares with the source (embeddings,
        # norms, MLPs, output projections) is the source's memory, not a copy: a judged plan costs its attention
        # weights only (own_weights gives a model its own copy, for training)
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
        missing = [k for k in missing if k != "lm_head.weight"]
        assert not missing and not unexpected, (missing, unexpected)
        model.tie_weights()
        model = model.to(dtype).eval()
        if plan.sequential:
            from .sequential import refit_sequential

            refit_sequential(self, plan, model)
        return model

    def group_weights(self, g: int, group: tuple[int, ...], plan: Plan, cfg: CllaConfig,
                      fit: LatentFit | None = None) -> dict[str, torch.Tensor]:
        """Float64 weights of layer group g under the plan: its latent projection (kv_down, rope_proj, latent_norm)
        and its layers' attention (see `layer_weights`), by parameter name; `fit`: the group's latent (default:
        fitted on the source's inputs, `plan_fit`)."""
        K, D, h, R = self.K, self.D, self.h, plan.group_width(g)
        choice = self.rope_choice(group, plan.rope_dim, plan.select_rope, plan.rope_heads)
        fit = fit if fit is not None else self.plan_fit(group, plan)
        A, B = fit.weights(R)
        if plan.rotate:  # each latent segment on its own: the tail's dims stay the tail's
            Q = torch.block_diag(*(rotation(w) for w, _ in plan.group_segments(g)))
            A, B = A @ Q.T, Q @ B
        first = self.stats[group[0]]
        gp = f"model.latent_proj.{g}."
        sd = {gp + "kv_down.weight": B}
        if plan.latent_norm:
            # A normed latent c·g/rms(c) equals c where rms(c) is its calibration mean E[|c|²/R]^½ (E[c cᵀ] = S²):
            # zero-shot, only the per-token spread of the latent's norm is lost; distillation trains the gain.
            sd[gp + "latent_norm.weight"] = torch.full((R,), (fit.S2[:R].sum().item() / R) ** 0.5, dtype=torch.float64)
        # Per-pair key scales: a real scalar per rotate-half pair commutes with RoPE, so dividing the rope key
        # and multiplying the query by it changes no score, and flattens outlier channels before quantization.
        scales = [self.rope_scale(group, choice, k) if plan.equalize_rope and plan.rope_bits < 16
                  else torch.ones(plan.rope_dim, 1, dtype=torch.float64) for k in range(plan.rope_heads)]
        if plan.rope_dim and not plan.rope_from_latent:
            if isinstance(choice, SharedRope):
                rope = choice.ws / scales[0]
            else:
                rope = torch.cat(
                    [first.wk[[k * D + d for d in rope_dims(choice.freq[k], D)]] / scales[k] for k in range(K)]
                )
            sd[gp + "rope_proj.weight"] = rope[:, :h]
            if cfg.qkv_bias:
                sd[gp + "rope_proj.bias"] = rope[:, h]
        offsets = [0]
        for blk in fit.blocks:
            offsets.append(offsets[-1] + blk.w.shape[0])
        for j, l in enumerate(group):
            rows: dict[str, list] = {"k": [], "v": [], "r": []}
            biases: dict[str, list] = {"k": [], "v": [], "r": []}
            for blk, start, end in zip(fit.blocks, offsets, offsets[1:]):
                if blk.layer == l or (blk.kind == "r" and isinstance(choice, SharedRope)):  # serves every layer
                    rows[blk.kind].append(A[start:end])
                    biases[blk.kind].append(blk.bias)
            sd |= self.layer_weights(l, j, choice, plan, scales, rows, biases, cfg)
        return sd

    def layer_weights(self, l: int, j: int, choice, plan: Plan, scales: list[torch.Tensor], rows: dict, biases: dict,
                      cfg: CllaConfig) -> dict[str, torch.Tensor]:
        """Attention weights of layer l, the group's j-th: up-projections from `rows` and `biases` (per target kind
        "k", "v", "r": its blocks' rows of the fit's A and their biases), and its queries in the plan's dims."""
        H, D, h = self.H, self.D, self.h
        ap = f"model.layers.{l}.self_attn."
        sd = {}
        for kind, name in (("r", "rope_up"), ("k", "k_up"), ("v", "v_up")):
            if rows[kind]:
                sd[ap + name + ".weight"] = torch.cat(rows[kind])
                if cfg.qkv_bias:
                    sd[ap + name + ".bias"] = torch.cat(biases[kind])
        if cfg.qk_norm:  # queries normed as the source does, then mapped per head; keys normed by k_scale
            a = self.src.model.layers[l].self_attn
            eye = torch.eye(D, dtype=torch.float64)
            sd[ap + "q_map"] = torch.stack([self.query_rows(eye, hq, j, choice, plan, scales) for hq in range(H)])
            sd[ap + "q_norm.weight"] = norm_gain(a.q_norm, cfg)
            for name, lin in (("q_proj", a.q_proj), ("k_scale.proj", a.k_proj)):
                sd[ap + name + ".weight"] = lin.weight
                if lin.bias is not None:
                    sd[ap + name + ".bias"] = lin.bias
            sd[ap + "k_scale.gain"] = 1 / self.stats[l].key_norm  # the fits saw keys scaled by the typical 1/RMS
            return sd
        wq = self.stats[l].wq
        q = torch.cat([self.query_rows(wq[hq * D : (hq + 1) * D].double(), hq, j, choice, plan, scales) for hq in range(H)])
        sd[ap + "q_proj.weight"] = q[:, :h]
        if cfg.qkv_bias:
            sd[ap + "q_proj.bias"] = q[:, h]
        return sd
