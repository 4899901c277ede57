"""Token weights of the latent fit: the attention each calibration token receives in the source, and the weighted
moments and fits built on it."""

import pytest
import torch
from typer.testing import CliRunner

from kvconvert.cli import app
from kvconvert.convert.build import Compressor
from kvconvert.convert.calibrate import Calibration, collect_inputs, moment, received_attention
from kvconvert.convert.plan import Plan, proxy_error

from conftest import VOCAB, save_source, tiny_source

runner = CliRunner()


def eager_received(model, chunks) -> list[torch.Tensor]:
    """What each token receives, from the attention weights transformers' eager path returns."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    got = [[] for _ in model.model.layers]
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, out, i=i: got[i].append(out[1].float().sum(2).mean(1).reshape(-1)))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for c in chunks:
                model.model(c, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.set_attn_implementation(before)
    return [torch.cat(g) for g in got]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3_text"])
def test_received_attention_is_what_the_source_attends_and_leaves_its_inputs_alone(arch):
    # mistral, gemma3_text: sliding windows (7 tokens of 40); gemma3_text: a scaling of its own
    src = tiny_source(arch)
    tokens = torch.randint(0, VOCAB, (6, 40), generator=torch.Generator().manual_seed(1))
    before = src.config._attn_implementation
    plain = collect_inputs(src, tokens, batch=4, received=False)
    cal = collect_inputs(src, tokens, batch=4)
    assert src.config._attn_implementation == before  # restored
    assert plain.received is None
    assert all(torch.equal(a, b) for a, b in zip(plain.inputs, cal.inputs))  # the forward is the source's own
    ref = eager_received(src, cal.chunks())
    for got, want in zip(cal.received, ref):
        assert got.shape == (cal.n,)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # every query's weights sum to 1: a row of T tokens hands out T in all
    assert torch.allclose(cal.received[1].view(6, 40).sum(1), torch.full((6,), 40.0), rtol=1e-4)


def test_received_attention_reads_every_mask_form_alike_and_samples_long_rows():
    g = torch.Generator().manual_seed(0)
    B, H, K, T, D = 2, 4, 2, 64, 8
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, K, T, D, generator=g)
    causal = torch.ones(T, T).tril().bool()[None, None].expand(B, 1, T, T)
    additive = torch.zeros(B, 1, T, T).masked_fill(~causal, torch.finfo(torch.float32).min)
    full = received_attention(q, k, None, 0.3)
    torch.testing.assert_close(received_attention(q, k, causal, 0.3), full)
    torch.testing.assert_close(received_attention(q, k, additive, 0.3), full)
    # by hand: softmax over the causal scores, summed over queries, averaged over heads
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(full, torch.softmax(s, -1).sum(2).mean(1))
    # a subset of the queries, scaled by its stride: close where many queries read a key, exact in total
    sub = received_attention(q, k, None, 0.3, max_queries=16)
    assert sub.sum(1).sub(T).abs().max() < 0.5
    assert (sub - full).norm() / full.norm() < 0.5
    assert not torch.allclose(sub, full)


def test_a_token_weighed_twice_is_a_token_counted_twice():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 5, generator=g), torch.randn(10, 5, generator=g)
    w = torch.ones(10, dtype=torch.float64)
    w[3] = 2
    twice = torch.cat([x, x[3:4]]), torch.cat([y, y[3:4]])
    torch.testing.assert_close(moment(x, y, w), moment(*twice), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(moment(x, y, w), moment(x, y))


def test_token_weights_mix_uniform_and_received():
    cal = Calibration(torch.zeros(1, 4, dtype=torch.long), [torch.zeros(4, 3)] * 2)
    assert cal.token_weights((0,), 0.5) is None and cal.weighted_cov((0,), 0.5) == cal.cov  # nothing recorded
    cal.received = [torch.tensor([2.5, 0.5, 0.5, 0.5]), torch.tensor([0.5, 0.5, 0.5, 2.5])]
    assert cal.token_weights((0, 1), 0.0) is None and cal.weighted_cov((0,), 0.0) == cal.cov
    torch.testing.assert_close(cal.token_weights((0,), 1.0), torch.tensor([2.5, 0.5, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(cal.token_weights((0,), 0.5), torch.tensor([1.75, 0.75, 0.75, 0.75], dtype=torch.float64))
    # a group's tokens weigh what they receive on average over its layers
    torch.testing.assert_close(cal.token_weights((0, 1), 1.0), torch.tensor([1.5, 0.5, 0.5, 1.5], dtype=torch.float64))


def test_the_fit_follows_the_tokens_that_weigh():
    """A token that receives (nearly) all the attention is reproduced by a narrow latent that the unweighted fit
    spends on the others; the plain fit is the same as before weights existed."""
    src = tiny_source("llama")
    tokens = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    cal = collect_inputs(src, tokens)
    heavy = 5  # one token of the first row
    cal.received = [torch.full((cal.n,), 1e-3) for _ in cal.inputs]
    for r in cal.received:
        r[heavy] = 1e3
    plan = Plan(((0,), (1,), (2,)), 8, 16, 16, rope_heads=2, rope_from_latent=True)

    def value_error(comp, layer=1):
        model = comp.build(plan)
        x = cal.inputs[layer][heavy : heavy + 1]
        a, s = model.model.layers[layer].self_attn, src.model.layers[layer].self_attn
        with torch.no_grad():
            v = a.v_up(model.model.latent_proj[layer].latent(x[None]))[0]
            want = s.v_proj(x)  # the bias is added exactly: the error is in what depends on the token
        return (v - want).norm().item()

    plain, weighted = value_error(Compressor(src, "llama", "tiny", cal, 0.0)), value_error(Compressor(src, "llama", "tiny", cal, 1.0))
    assert weighted < plain / 20  # measured: 1.7e-2 and 5e-6
    # β = 0 takes the plain moments: the fit is bit for bit the one without any received attention
    bare = Calibration(cal.tokens, cal.inputs)
    a = Compressor(src, "llama", "tiny", cal, 0.0).build(plan).state_dict()
    b = Compressor(src, "llama", "tiny", bare, 0.5).build(plan).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_proxy_ranks_on_plain_fits_and_the_build_takes_the_weighted_ones():
    """The planner's proxy fits every token alike; the model it builds is fitted on the weighted moments whatever
    was fitted first (a cache shared between the two once built models from mixed fits)."""
    src = tiny_source("llama")
    tokens = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))
    cal = collect_inputs(src, tokens)
    plan = Plan(((0,), (1, 2)), 8, 16, 4, rope_heads=2, quant_group=8, rope_from_latent=True)
    after_proxy = Compressor(src, "llama", "tiny", cal, 0.5)
    proxy = proxy_error(after_proxy, plan)
    built = after_proxy.build(plan).state_dict()
    fresh = Compressor(src, "llama", "tiny", cal, 0.5).build(plan).state_dict()
    plain = Compressor(src, "llama", "tiny", cal, 0.0)
    assert all(torch.equal(built[k], fresh[k]) for k in built)
    assert any(not torch.equal(built[k], v) for k, v in plain.build(plan).state_dict().items())
    assert proxy == proxy_error(plain, plan)


def test_an_attention_weight_out_of_range_is_refused(tmp_path):
    src_dir, _ = save_source(tmp_path, "llama")
    res = runner.invoke(app, ["convert", str(src_dir), str(tmp_path / "bad"), "--kv-ratio", "0.5",
                              "--attention-weight", "1.5"])
    assert res.exit_code != 0 and "--attention-weight must be in [0, 1]" in res.output
    assert not (tmp_path / "bad").exists()
