"""CPU weight layout (runtime/layout.py): the same values and shapes in input-major storage, and the same decode."""

import copy

import torch

from kvconvert.convert.identity import build_identity
from kvconvert.runtime import LatentRuntime, SamplingOptions
from kvconvert.runtime.layout import gemv_layout, gemv_layout_, is_input_major

from conftest import tiny_source
from test_runtime import TAIL, prompt, teacher_forced, tiny_clla


def test_gemv_layout_keeps_values_and_shapes():
    """Wide weights (out >= in) move to input-major storage, bit for bit; narrow ones (a down projection) stay;
    tied embeddings move once and stay tied; a second pass moves nothing."""
    model = build_identity(tiny_source("llama"), "llama", "tiny")  # tied embeddings, every bias
    before = copy.deepcopy(model.state_dict())
    moved = gemv_layout_(model)
    assert moved > 0
    for name, p in model.state_dict().items():
        assert p.shape == before[name].shape and torch.equal(p, before[name]), name
    mlp = model.model.layers[0].mlp
    assert is_input_major(mlp.gate_proj.weight) and is_input_major(mlp.up_proj.weight)  # (128, 64)
    assert mlp.down_proj.weight.is_contiguous()  # (64, 128): row-major reads it faster
    assert model.lm_head.weight is model.model.embed_tokens.weight and is_input_major(model.lm_head.weight)
    assert gemv_layout_(model) == 0
    w = gemv_layout(torch.randn(8, 8))
    assert is_input_major(w) and gemv_layout(w) is w
    narrow = torch.randn(4, 8)
    assert gemv_layout(narrow) is narrow


def test_runtime_on_cpu_layout_equals_row_major():
    """Decoding over the re-laid-out weights gives the tokens and, to float rounding, the logits of the row-major
    weights, for a converted model with folded and unfolded projections, a mixed-precision latent and rope keys
    from the latent."""
    for model in (tiny_clla(TAIL), tiny_clla(4, rope_from_latent=True, rope_bits=16, qk_nope_dim=0, rope_dim=16,
                                             rope_heads=2), tiny_clla(16, kv_latent_dim=16, qk_nope_dim=16)):
        plain = copy.deepcopy(model)
        ids = prompt(13, seed=3)
        rt, ref = LatentRuntime(model, 1, 48, cpu_layout=True), LatentRuntime(plain, 1, 48)
        assert any(is_input_major(p) for p in model.parameters())
        assert all(p.is_contiguous() for p in plain.parameters())
        got, _ = rt.generate([ids], SamplingOptions(max_new_tokens=12))
        want, _ = ref.generate([ids], SamplingOptions(max_new_tokens=12))
        assert got == want
        a, b = teacher_forced(rt, ids + got[0], 13), teacher_forced(ref, ids + want[0], 13)
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_runtime_relayouts_the_model_only_when_asked():
    """The layout pays at one row only (bench/studies/gemv_layout.py), and it changes the caller's model: a runtime leaves
    the model's layout alone unless asked (cpu_layout=True), at any batch."""
    model = tiny_clla(4)
    LatentRuntime(model, 2, 16)
    assert all(p.is_contiguous() for p in model.parameters())
    LatentRuntime(model, 2, 16, cpu_layout=True)
    assert any(is_input_major(p) for p in model.parameters())


def test_default_runtime_leaves_the_callers_weights_untouched():
    """A one-row CPU runtime with the defaults decodes over the caller's weights as they are: every parameter keeps
    its storage, strides and values (rope keys from the latent and folded projections are the runtime's own)."""
    for model in (tiny_clla(TAIL), tiny_clla(4, rope_from_latent=True, rope_bits=16, qk_nope_dim=0, rope_dim=16,
                                             rope_heads=2)):
        before = {name: (p.data_ptr(), p.stride(), p.detach().clone()) for name, p in model.named_parameters()}
        rt = LatentRuntime(model, 1, 48)
        rt.generate([prompt(13, seed=3)], SamplingOptions(max_new_tokens=4))
        for name, p in model.named_parameters():
            ptr, stride, values = before[name]
            assert p.data_ptr() == ptr and p.stride() == stride and torch.equal(p, values), name
