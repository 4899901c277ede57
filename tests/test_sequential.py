"""Sequential refit (kvconvert.convert.sequential): each group's latent refitted on the converted model's own input."""

import pytest
import torch

from kvconvert.convert.build import Compressor
from kvconvert.convert.calibrate import collect_inputs
from kvconvert.convert.groups import uniform_groups
from kvconvert.convert.plan import Plan
from kvconvert.convert.sequential import augmented, refit_sequential

from conftest import VOCAB, tiny_source


def compressor(arch: str, layers: int = 4, long: bool = True):
    extra = {}
    if arch == "gemma3_text":  # sliding and full layers, so that LOSSY's pair (1, 2) shares a kind
        extra["layer_types"] = (["sliding_attention", "full_attention", "full_attention"] * 2)[:layers]
    src = tiny_source(arch, num_hidden_layers=layers, **extra)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (10, 32), generator=g)
    rows = torch.randint(0, VOCAB, (2, 96), generator=g) if long else None
    return src, Compressor(src, arch, "tiny", collect_inputs(src, tokens, batch=4, long=rows))


def logits_error(src, model) -> float:
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = src(ids).logits, model(ids).logits
    return ((a - b).abs().max() / a.abs().max()).item()


LOSSY = Plan(((0,), (1, 2), (3,)), latent_dim=16, rope_dim=16, kv_bits=4, quant_group=16, rope_heads=2,
             rope_from_latent=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text"])
def test_a_lossless_plan_stays_lossless(arch):
    """A full-width plan reproduces the source's inputs exactly, so its refit is the same fit: still exact (misaligned
    moments, or a forward that differs from the model's, would break it)."""
    src, comp = compressor(arch, layers=3)
    plan = Plan(uniform_groups(3, 1), latent_dim=2 * 16, rope_dim=16, kv_bits=16, rope_heads=2)
    model = comp.build(plan)
    before = logits_error(src, model)
    refit_sequential(comp, plan, model)
    assert before <= 1e-4 and logits_error(src, model) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_the_refit_sees_the_converted_models_own_inputs(arch):
    """The first group's input is the source's (embeddings are exact): its weights are unchanged. Every later group
    was fitted on the moments of the refitted model's own input at its first layer, as its forward computes them,
    each token weighted as in the plain fit."""
    _, comp = compressor(arch)
    seen = {}
    fit = comp.plan_fit

    def spy(group, plan, inputs=None):
        if inputs is not None:
            seen[group] = inputs[0].clone()
        return fit(group, plan, inputs)

    comp.plan_fit = spy
    before = comp.build(LOSSY)
    model = comp.build(LOSSY)
    refit_sequential(comp, LOSSY, model)
    state, old = model.state_dict(), before.state_dict()
    group0 = [k for k in state if k.startswith(("model.latent_proj.0.", "model.layers.0.self_attn."))]
    assert group0 and all(torch.allclose(state[k], old[k], rtol=1e-4, atol=1e-6) for k in group0)
    changed = [k for k in state if k.startswith("model.latent_proj.1.") and not torch.equal(state[k], old[k])]
    assert changed  # the second group's input drifted, so its fit moved
    # the moments each group was fitted on, recomputed from the refitted model's forward
    inputs = {f: [] for f in (1, 3)}
    hooks = [model.model.layers[f].register_forward_pre_hook(
        lambda m, a, f=f: inputs[f].append(m.input_layernorm(a[0]).reshape(-1, a[0].shape[-1])))
        for f in inputs]
    with torch.no_grad():
        for chunk in comp.cal.chunks():
            model(chunk, use_cache=False)
    for h in hooks:
        h.remove()
    for f, group in ((1, (1, 2)), (3, (3,))):
        x = augmented(torch.cat(inputs[f]))
        w = comp.cal.token_weights(group, comp.attention_weight)  # each token as the plain fit weighs it
        assert w is not None and w.std() > 0.1
        assert torch.allclose(seen[group], (x * w[:, None]).T @ x / w.sum(), rtol=1e-5, atol=1e-7), group


def test_the_refit_corrects_the_drift():
    """On the calibration rows the refitted model is closer to the source (KL) than the plan fitted on the source's
    inputs alone, on a plan where early groups lose a lot."""
    src, comp = compressor("llama", layers=6)
    plan = Plan(uniform_groups(6, 2), latent_dim=16, rope_dim=16, kv_bits=4, quant_group=16, rope_heads=1,
                rope_from_latent=True)
    tokens = comp.cal.tokens

    def kl(model):
        with torch.no_grad():
            p = torch.log_softmax(src(tokens).logits, -1)
            q = torch.log_softmax(model(tokens).logits, -1)
        return (p.exp() * (p - q)).sum(-1).mean().item()

    model = comp.build(plan)
    plain = kl(model)
    refit_sequential(comp, plan, model)
    assert kl(model) < plain
