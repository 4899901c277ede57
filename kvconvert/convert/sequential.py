"""Sequential refit: each group's latent fitted on the input the converted model itself gives it.

The planner's fits map the *source's* normed input of a group's first layer, x_f, onto the source's keys and values.
In the converted model that input has drifted by every earlier group's error. Going through the converted model group
by group over the calibration rows (as GPTQ-style quantizers go through a network layer by layer), each group's
latent is refitted from the converted model's own input x̂_f onto the same targets, the source's keys and values:
the regression of kvconvert.convert.latent with C = E[x̂_f x̂_fᵀ] and T = W E[x_l x̂_fᵀ]. A group can then undo what
the groups before it got wrong, where its input still carries it.
"""

from __future__ import annotations

import torch

from ..model import CllaForCausalLM
from .build import Compressor
from .plan import Plan

def augmented(x: torch.Tensor) -> torch.Tensor:
    """(N, h) -> (N, h + 1) float64 with a constant 1 appended (see calibrate.Calibration.cov)."""
    return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)


@torch.no_grad()
def refit_sequential(comp: Compressor, plan: Plan, model: CllaForCausalLM) -> None:
    """Refit `model` (built by comp.build(plan)) in place, group by group, on the calibration rows comp was fitted
    on; the source's statistics (comp.cal.inputs) give the targets."""
    cal, cfg, inner, h = comp.cal, model.config, model.model, comp.h
    dtype = next(model.parameters()).dtype
    chunks = cal.chunks()
    states = [inner.embed(c) for c in chunks]
    setup = [inner.attention_inputs(h) for h in states]  # (cos, sin, masks) per chunk
    spans, at = [], 0
    for c in chunks:
        spans.append((at, at + c.numel()))
        at += c.numel()
    assert at == cal.n, "internal: the calibration chunks do not match the statistics"
    for g, group in enumerate(plan.groups):
        first = inner.layers[group[0]]
        C = torch.zeros(h + 1, h + 1, dtype=torch.float64)
        cross = {layer: torch.zeros(h + 1, h + 1, dtype=torch.float64) for layer in group}
        w = cal.token_weights(tuple(group), comp.attention_weight)  # as the plain fit weighs the tokens
        w = torch.ones(cal.n, dtype=torch.float64) if w is None else w
        for state, (lo, hi) in zip(states, spans):
            x = augmented(first.input_layernorm(state).reshape(-1, h).float())
            xw = x * w[lo:hi, None]
            C += xw.T @ x
            for layer in group:
                cross[layer] += augmented(cal.inputs[layer][lo:hi]).T @ xw
        C /= w.sum()
        for layer in group:
            cross[layer] /= w.sum()
        fit = comp.plan_fit(group, plan, inputs=(C, cross.__getitem__))
        weights = comp.group_weights(g, group, plan, cfg, fit)
        _, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
        assert not unexpected, unexpected
        for i, state in enumerate(states):  # through the refitted group
            cos, sin, masks = setup[i]
            latent = k_rope = None
            for layer_index in group:
                proj = inner.latent_proj[g] if layer_index == group[0] else None
                state, latent, k_rope = inner.layers[layer_index](
                    state, latent, k_rope, cos[g], sin[g], masks[cfg.layer_windows[layer_index]], proj, None, g)
            states[i] = state
