"""The runtime (LatentCache + absorbed decode) computes what CllaForCausalLM computes, at every bit width."""

import pytest
import torch

from kvconvert.config import CllaConfig, kv_bytes, kv_bytes_per_token
from kvconvert.convert.identity import build_identity
from kvconvert.errors import KvconvertError
from kvconvert.model import CllaForCausalLM
from kvconvert.runtime.cache import LatentCache
from kvconvert.runtime import LatentRuntime, SamplingOptions, sample

from conftest import VOCAB, tiny_source
from grids import grid


TAIL = "4+2"  # `bits` of a mixed-precision latent: a 4-bit head, a 2-bit tail of half the latent, 4-bit rope keys


def tiny_clla(bits: int | str, seed: int = 0, **overrides) -> CllaForCausalLM:
    """A random compressed plan with every awkward feature: groups of 1 and 2 layers, nope + rope key dims, a rope
    head per kv head, biases, a sliding-window layer inside a group. bits: 16, 8, 4 or TAIL."""
    torch.manual_seed(seed)
    tail = bits == TAIL
    bits = 4 if tail else bits
    kw = dict(
        vocab_size=VOCAB,
        num_hidden_layers=4,
        layer_groups=[[0], [1, 2], [3]],
        kv_latent_dim=48,
        qk_nope_dim=8,
        rope_dim=8,
        rope_heads=2,
        kv_bits=bits,
        kv_quant_group=16,
        rope_bits=bits,
        qkv_bias=True,
        o_bias=True,
        initializer_range=0.1,
        layer_windows=[None, 6, None, None],
    ) | overrides
    if tail:
        R = kw["kv_latent_dim"]
        kw["kv_quant_group"] = group = 8 if R >= 16 else 4
        kw["kv_tail_dim"] = R // 2 // group * group
    model = CllaForCausalLM(CllaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
            elif name.endswith("q_map"):  # qk_norm: a random map from the normed query into the plan's dims
                p.normal_(0, 0.5)
            elif name.endswith(("q_norm.weight", "k_scale.gain")):
                p.uniform_(0.5, 2.0)
    for layer in model.model.layers:
        if layer.self_attn.k_scale is not None:
            # The cache stores key norms in fp16; round them so here too, so that the fp32 model is what the runtime
            # computes (a 4-bit latent's codes would otherwise flip on the difference, upstream of every comparison)
            k_scale = layer.self_attn.k_scale
            k_scale.forward = lambda x, f=k_scale.forward: f(x).half().to(x.dtype)
    return model


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids) :].tolist()


@torch.no_grad()
def teacher_forced(rt: LatentRuntime, ids: list[int], split: int) -> torch.Tensor:
    """Logits (len(ids) - split + 1, V): prefill ids[:split], then decode the rest one token at a time."""
    rt.reset()
    steps = [rt.prefill_chunked(torch.tensor([ids[:split]], device=rt.device), [split])[0]]
    for t in ids[split:]:
        steps.append(rt.decode(torch.tensor([t], device=rt.device))[0])
    return torch.stack(steps)


def assert_runtime_equals_model(rt: LatentRuntime, model, ids: list[int], n: int, tol: float):
    """n greedy tokens equal the model's own generate, and the teacher-forced logits of prompt + those tokens are
    within `tol` (relative to the largest logit). Returns the runtime's generation stats."""
    ref = reference_greedy(model, ids, n)
    out, stats = rt.generate([ids], SamplingOptions(max_new_tokens=n))
    assert out[0] == ref
    full = ids + ref
    with torch.no_grad():
        want = model(torch.tensor([full])).logits[0, len(ids) - 1 : -1]
    got = teacher_forced(rt, full[:-1], len(ids))
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tol, err
    return stats


# 16-bit streams are stored in fp16 (the 2 bytes the formula counts) while this model computes in fp32.
LOGIT_TOL = {16: 2e-3, 8: 1e-4, 4: 1e-4, TAIL: 1e-4}


# A latent wider than the key dims keeps the up-projections apart; a narrow one folds W_uk into the query and
# W_uv into the output projection (absorb_layer): both paths run at every bit width.
PLANS = {"wide": dict(kv_latent_dim=48, qk_nope_dim=8), "folded": dict(kv_latent_dim=16, qk_nope_dim=16),
         # narrow enough that the prompt is attended over the latent too (absorbed prefill) with one rope head
         "narrow": dict(kv_latent_dim=8, qk_nope_dim=16, kv_quant_group=8)}


QK_NORM_ID = {"qk_norm": lambda v: "qk_norm" if v else "plain"}


@pytest.mark.parametrize(
    "bits,rope_heads,plan,qk_norm",
    grid(dict(bits=[16, 8, 4, TAIL], rope_heads=[1, 2], plan=list(PLANS), qk_norm=[False, True]),
         valid=lambda bits, rope_heads, plan, qk_norm: not (qk_norm and bits in (8, TAIL)), ids=QK_NORM_ID),
)
def test_greedy_and_logits_equal_the_model(bits, rope_heads, plan, qk_norm):
    """Every plan shape; with qk_norm (Qwen3, Gemma 3) the per-layer key norms are cached and scale the scores
    (16 and 4 bits cover both storage paths there)."""
    model = tiny_clla(bits, rope_heads=rope_heads, qk_norm=qk_norm, **PLANS[plan])
    rt = LatentRuntime(model, batch=1, capacity=64)
    assert all((lay.w_uk is None and lay.w_uv_t is None) == (plan != "wide") for lay in rt.layers)
    assert rt.absorbed_prefill == (plan == "narrow" and rope_heads == 1)
    stats = assert_runtime_equals_model(rt, model, prompt(11, seed=1), 20, LOGIT_TOL[bits])
    assert stats.new_tokens == 20 and stats.prompt_tokens == 11


@pytest.mark.parametrize("bits", [16, 4])
def test_latent_norm_is_applied_before_the_cache(bits):
    """DeepSeek's kv_a_layernorm (latent_norm): the runtime caches the normed latent, as the model computes it."""
    model = tiny_clla(bits, latent_norm=True)
    with torch.no_grad():
        for proj in model.model.latent_proj:
            proj.latent_norm.weight.uniform_(0.5, 1.5)
    ids = prompt(11, seed=3)
    ref = reference_greedy(model, ids, 16)
    out, _ = LatentRuntime(model, 1, 64).generate([ids], SamplingOptions(max_new_tokens=16))
    assert out[0] == ref
    plain = tiny_clla(bits)  # same seed, same weights, no norm: a different model
    assert reference_greedy(plain, ids, 16) != ref


@pytest.mark.parametrize("bits,policy,qk_norm", grid(dict(bits=[16, 4, TAIL], policy=[None, "zsmerge"],
                                                         qk_norm=[False, True]), ids=QK_NORM_ID))
def test_absorbed_prefill_equals_the_models_attention(bits, policy, qk_norm):
    """The prompt attended over the latent (absorbed, MQA) gives the logits of the model's own attention over
    reconstructed keys and values: a fresh causal prompt, a second chunk with an explicit mask, a sliding-window
    layer, a ragged batch, and merged slots' log-weights under a policy (with qk_norm: key norms, merged too, and a
    key bias that they make position-dependent)."""
    from kvconvert.runtime.policies import make_policy

    model = tiny_clla(bits, rope_heads=1, qk_norm=qk_norm, **PLANS["narrow"])
    prompts = [prompt(n, seed=30 + n) for n in (21, 13)]
    T = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    outs = []
    for absorbed in (True, False):
        rt = LatentRuntime(model, 2, 48, policy=make_policy(policy, 12) if policy else None, context=64)
        assert rt.absorbed_prefill
        rt.absorbed_prefill = absorbed
        first = rt.prefill(ids[:, :9], [9, 9], all_logits=True)
        second = rt.prefill(ids[:, 9:], [len(p) - 9 for p in prompts], all_logits=True)
        outs.append(torch.cat([first, second], 1))
    err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
    assert err <= 1e-5, err


# Rope keys reconstructed from the latent (rope_from_latent): every key dim of each kv head through RoPE after the
# up-projection, or one shared rope head beside position-free dims. Nothing but the latent is cached.
FROM_LATENT = {"per kv head": dict(qk_nope_dim=0, rope_dim=16, rope_heads=2),
               "shared": dict(qk_nope_dim=16, rope_dim=16, rope_heads=1)}


@pytest.mark.parametrize("bits,rope,qk_norm", grid(dict(bits=[16, 4, TAIL], rope=list(FROM_LATENT), qk_norm=[False, True]),
                                                   valid=lambda bits, rope, qk_norm: not (qk_norm and bits == TAIL),
                                                   ids=QK_NORM_ID))
def test_rope_from_latent_equals_the_model(bits, rope, qk_norm):
    """Greedy tokens and teacher-forced logits equal the model's own (which rotates reconstructed rope keys at
    each key's position, through HF generate's cache too); the cache holds the latent alone, as the formula says
    (with qk_norm, 16 and 4 bits cover both storage paths)."""
    model = tiny_clla(bits, rope_from_latent=True, rope_bits=16, qk_norm=qk_norm, **FROM_LATENT[rope])
    rt = LatentRuntime(model, batch=1, capacity=64)
    assert all(rt.cache.rope(g) is None for g in range(model.config.num_layer_groups))
    assert rt.cache.nbytes == kv_bytes_per_token(model.config) * 64
    assert_runtime_equals_model(rt, model, prompt(11, seed=1), 20, LOGIT_TOL[bits])


def assert_16_bit_rope_from_latent_close(dtype=torch.bfloat16, device="cpu", tol: float = 0.06) -> None:
    """A 16-bit model with rope keys from the latent decodes (its rotated rope queries stay in the model's dtype,
    which the kernels' dot operands and the output projection take) within 16-bit error of the same model in
    float32: teacher-forced logits of a prompt and 12 decoded tokens."""
    import copy

    model = tiny_clla(4, rope_from_latent=True, rope_bits=16, **FROM_LATENT["per kv head"])
    half = copy.deepcopy(model).to(device, dtype)
    ids = prompt(20, seed=3)
    want = teacher_forced(LatentRuntime(model, batch=1, capacity=32), ids, 8)
    got = teacher_forced(LatentRuntime(half, batch=1, capacity=32), ids, 8).cpu()
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = (got.float() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), err


def test_rope_from_latent_in_bfloat16():
    assert_16_bit_rope_from_latent_close()


@pytest.mark.parametrize("bits", [16, 4])
def test_rope_from_latent_ring_and_ragged_batch(bits):
    """A sliding-window group kept as a ring rotates each slot at the position that wrapped onto it; ragged rows
    equal one-by-one runs; the absorbed prompt path (a shared rope head) equals the model's attention, with and
    without a cache policy."""
    model = tiny_clla(bits, rope_from_latent=True, rope_bits=16, **FROM_LATENT["per kv head"], **RING)
    rt = LatentRuntime(model, batch=1, capacity=64, ring_chunk=4)
    assert rt.cache.slots == [64, 9, 64]
    assert_runtime_equals_model(rt, model, prompt(30, seed=7), 16, LOGIT_TOL[bits])
    prompts = [prompt(n, seed=n) for n in (5, 13, 1)]
    batched, _ = LatentRuntime(model, 3, 48).generate(prompts, SamplingOptions(max_new_tokens=10))
    for p, got in zip(prompts, batched):
        alone, _ = LatentRuntime(model, 1, 48).generate([p], SamplingOptions(max_new_tokens=10))
        assert got == alone[0]
    from kvconvert.runtime.policies import make_policy

    narrow = tiny_clla(bits, rope_from_latent=True, rope_bits=16, rope_heads=1, **PLANS["narrow"])
    ids = torch.tensor([prompt(21, seed=5)])
    for policy in (None, "zsmerge"):  # under a policy: merged slots, their log-weights and mean positions
        outs = []
        for absorbed in (True, False):
            rt = LatentRuntime(narrow, 1, 48, policy=make_policy(policy, 8) if policy else None, context=64)
            assert rt.absorbed_prefill
            rt.absorbed_prefill = absorbed
            outs.append(torch.cat([rt.prefill(ids[:, :9], [9], all_logits=True),
                                   rt.prefill(ids[:, 9:], [12], all_logits=True)], 1))
        assert ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item() <= 1e-5


def test_latent_without_rope_and_rope_without_nope():
    for overrides in (dict(rope_dim=0, qk_nope_dim=16), dict(qk_nope_dim=0, rope_dim=16, rope_heads=4)):
        model = tiny_clla(8, **overrides)
        ids = prompt(9, seed=2)
        out, _ = LatentRuntime(model, 1, 40).generate([ids], SamplingOptions(max_new_tokens=12))
        assert out[0] == reference_greedy(model, ids, 12), overrides


@pytest.mark.parametrize("bits", [16, 4])
def test_ragged_batch_equals_one_by_one(bits):
    model = tiny_clla(bits)
    prompts = [prompt(n, seed=n) for n in (5, 13, 1)]
    batched, _ = LatentRuntime(model, 3, 48).generate(prompts, SamplingOptions(max_new_tokens=10))
    for p, got in zip(prompts, batched):
        alone, _ = LatentRuntime(model, 1, 48).generate([p], SamplingOptions(max_new_tokens=10))
        assert got == alone[0]


def assert_same_greedy_until_a_tie(got: list[int], want: list[int], model, ids: list[int], tol: float):
    """Greedy tokens agree, except that after a step where the reference's top two logits are within `tol` (a tie
    that fp16 storage may break either way) the continuations may differ."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + want])).logits[0, len(ids) - 1 :]
    for t, (a, b) in enumerate(zip(got, want)):
        if a != b:
            margin = (logits[t, b] - logits[t, a]).item()
            assert margin <= tol * logits.abs().max().item(), (t, a, b, margin)
            return
    assert len(got) == len(want)


def test_identity_runtime_equals_source_generate(arch):
    """The source through an identity conversion: its greedy tokens, its logits (the cache stores fp16)."""
    src = tiny_source(arch)
    clla = build_identity(src, arch, "tiny")
    ids = prompt(12, seed=3)  # > mistral's window of 7
    want = src.generate(torch.tensor([ids]), max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = want[0, 12:].tolist()
    rt = LatentRuntime(clla, 1, 32)
    out, _ = rt.generate([ids], SamplingOptions(max_new_tokens=15))
    assert_same_greedy_until_a_tie(out[0], want, src, ids, 2 * LOGIT_TOL[16])
    with torch.no_grad():
        ref = src(torch.tensor([ids + want])).logits[0, 11:-1]
    got = teacher_forced(rt, (ids + want)[:-1], 12)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= LOGIT_TOL[16]
    if any(w is not None for w in clla.config.layer_windows):  # Mistral, Gemma 3: sliding layers as rings too
        rt = LatentRuntime(clla, 1, 32, ring_chunk=3)
        assert any(rt.cache.is_ring(g) for g in range(clla.config.num_layer_groups))
        got = teacher_forced(rt, (ids + want)[:-1], 12)
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= LOGIT_TOL[16]


def test_second_turn_continues_the_cache():
    """A prompt appended after a finished turn sees the whole history: same as one prefill of everything."""
    model = tiny_clla(4)
    a, b = prompt(7, seed=4), prompt(5, seed=5)
    rt = LatentRuntime(model, 1, 64)
    first, _ = rt.generate([a], SamplingOptions(max_new_tokens=6))
    # generate() leaves the last sampled token uncached: the next turn starts with it.
    second, _ = rt.generate([first[0][-1:] + b], SamplingOptions(max_new_tokens=6))
    history = a + first[0] + b
    assert second[0] == reference_greedy(model, history, 6)


# Layers 1 and 2 (one group) slide over windows of 6 and 5 tokens: with ring_chunk 4 the group keeps a ring of
# 6 + 4 - 1 = 9 slots that a 30-token conversation wraps around three times.
RING = dict(layer_windows=[None, 6, 5, None])


@pytest.mark.parametrize("bits", [16, 4, TAIL])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["", "qk_norm"])
def test_sliding_window_ring_equals_the_model(bits, qk_norm):
    """A sliding-window group cached as a ring (token p in slot p % 9) gives the model's greedy tokens and logits,
    through chunked prefill and decode past several wrap-arounds, and allocates only its ring."""
    model = tiny_clla(bits, qk_norm=qk_norm, **RING)
    rt = LatentRuntime(model, batch=1, capacity=64, ring_chunk=4)
    assert rt.cache.slots == [64, 9, 64] and rt.ring_chunk == 4
    assert rt.cache.nbytes == kv_bytes(model.config, 64, 4) < kv_bytes_per_token(model.config) * 64
    ids = prompt(30, seed=7)
    assert_runtime_equals_model(rt, model, ids, 16, LOGIT_TOL[bits])
    with pytest.raises(ValueError, match="exceeds the rings"):
        rt.prefill(torch.tensor([ids[:5]]), [5])


def test_sliding_window_ring_ragged_batch_and_truncate():
    """Ragged rows wrap the ring at different steps and equal one-by-one runs; truncating within what the ring
    still holds continues the cache, further back starts over."""
    model = tiny_clla(4, **RING)
    prompts = [prompt(n, seed=n) for n in (5, 23, 1)]
    batched, _ = LatentRuntime(model, 3, 48, ring_chunk=4).generate(prompts, SamplingOptions(max_new_tokens=10))
    for p, got in zip(prompts, batched):
        alone, _ = LatentRuntime(model, 1, 48).generate([p], SamplingOptions(max_new_tokens=10))  # ring_chunk 1024
        assert got == alone[0]
    rt = LatentRuntime(model, 1, 64, ring_chunk=4)
    ids = prompt(20, seed=9)
    rt.prefill_chunked(torch.tensor([ids]), [20])
    rt.truncate(18)  # the ring (9 slots) still holds the window (6) before token 18
    assert rt.seen == [18]
    logits = rt.prefill_chunked(torch.tensor([ids[18:]]), [2])[0]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, -1]
    assert ((logits - want).abs().max() / want.abs().max()).item() <= LOGIT_TOL[4]
    rt.truncate(10)  # overwritten: start over
    assert rt.seen == [0] and rt.lengths == [0]
    # Padding can run past every row's tokens: rows of 7 and 10 tokens take 4 and 1 more in one padded step, so
    # both hold 11 but row 1 wrote up to position 13, whose slots (9 of them) held its positions 3 and 4, inside
    # the window (6) before 8: truncating to 8 must start over.
    rt = LatentRuntime(model, 2, 64, ring_chunk=4)
    rt.prefill_chunked(torch.tensor([ids[:7] + [0] * 3, ids[:10]]), [7, 10])
    rt.prefill(torch.tensor([ids[7:11], ids[10:14]]), [4, 1])
    assert rt.seen == [11, 11] and rt.written == [11, 14]
    rt.truncate(8)
    assert rt.seen == [0, 0]


@pytest.mark.parametrize("bits", [16, 8, 4, TAIL])
def test_cache_bytes_equal_the_formula(bits):
    rope_bits = {4: 8, TAIL: 2}.get(bits, bits)
    cfg = tiny_clla(bits, rope_bits=rope_bits).config
    cache = LatentCache(cfg, batch=3, capacity=17)
    assert cache.bytes_per_token == kv_bytes_per_token(cfg)
    assert cache.nbytes == kv_bytes_per_token(cfg) * 3 * 17
    # a sliding-window group kept as a ring: the bytes of its ring, key norms included
    cfg = tiny_clla(bits, rope_bits=rope_bits, qk_norm=True, **RING).config
    cache = LatentCache(cfg, batch=3, capacity=40, ring_chunk=5)
    assert cache.slots == [40, 10, 40]
    assert cache.nbytes == kv_bytes(cfg, 40, 5) * 3
    assert cache.nbytes == sum(t.nbytes for t in cache._key_scales) + sum(
        st.data.nbytes + (0 if st.scales is None else st.scales.nbytes) for g in range(3)
        for st in cache.latent_streams(g) + ([cache.rope(g)] if cache.rope(g) else []))
    assert len(cache.latent_streams(0)) == (2 if bits == TAIL else 1)
    assert kv_bytes(cfg, 8, 5) == kv_bytes_per_token(cfg) * 8  # shorter than the ring: every token counts


def test_stop_tokens_end_a_row():
    model = tiny_clla(8)
    ids = prompt(6, seed=6)
    ref = reference_greedy(model, ids, 10)
    stop = ref[4]
    out, _ = LatentRuntime(model, 1, 32).generate([ids], SamplingOptions(max_new_tokens=10, stop_token_ids=(stop,)))
    assert out[0] == ref[: ref.index(stop)]


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    opts = SamplingOptions(temperature=1.0, top_k=3, seed=0)
    draws = torch.stack([sample(logits, opts, torch.Generator().manual_seed(s)) for s in range(200)])
    top3 = logits.topk(3, -1).indices
    assert all(bool((top3[b] == draws[:, b, None]).any(-1).all()) for b in range(4))
    assert len(set(draws[:, 0].tolist())) > 1  # it does sample
    a = sample(logits, opts, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample(logits, opts, torch.Generator().manual_seed(7)))


def test_top_p_keeps_the_smallest_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    opts = SamplingOptions(temperature=1.0, top_p=0.7)
    draws = {sample(logits, opts, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {0, 1}


def test_context_overflow_is_a_clear_error():
    model = tiny_clla(8)
    rt = LatentRuntime(model, 1, 16)
    with pytest.raises(KvconvertError, match="context full"):
        rt.generate([prompt(10, seed=7)], SamplingOptions(max_new_tokens=10))
    with pytest.raises(KvconvertError, match="max_position_embeddings"):
        LatentRuntime(model, 1, model.config.max_position_embeddings + 1)


def test_out_of_memory_is_a_clear_error(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "zeros", oom)
    with pytest.raises(KvconvertError, match="out of memory allocating the KV cache"):
        LatentCache(tiny_clla(4).config, batch=8, capacity=1024)


def test_chunked_prefill_equals_one_prefill():
    model = tiny_clla(4)
    prompts = [prompt(n, seed=10 + n) for n in (23, 9, 17)]
    T = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts])
    one = LatentRuntime(model, 3, 40)
    chunked = LatentRuntime(model, 3, 40)
    want = one.prefill(ids, [len(p) for p in prompts])
    got = chunked.prefill_chunked(ids, [len(p) for p in prompts], chunk=5)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert chunked.lengths == one.lengths == [23, 9, 17]
    nxt = torch.tensor([1, 2, 3])
    assert torch.allclose(chunked.decode(nxt), one.decode(nxt), rtol=1e-5, atol=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [16, 8, 4, TAIL])
def test_cuda_graph_decode_equals_eager(bits):
    """The captured decode step replays exactly what the eager step computes (same kernels, same inputs)."""
    model = tiny_clla(bits).cuda()
    prompts = [prompt(n, seed=20 + n) for n in (7, 12)]
    eager, _ = LatentRuntime(model, 2, 64, cuda_graphs=False).generate(prompts, SamplingOptions(max_new_tokens=16))
    graphed, _ = LatentRuntime(model, 2, 64, cuda_graphs=True).generate(prompts, SamplingOptions(max_new_tokens=16))
    assert graphed == eager


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_across_filled_buckets():
    """Rows that grow from 250 past 256 tokens cross a filled-length bucket: a second graph is captured, and the
    tokens are still the eager step's."""
    model = tiny_clla(4, rope_from_latent=True, rope_bits=16, **FROM_LATENT["per kv head"]).cuda()
    prompts = [prompt(250, seed=5), prompt(240, seed=6)]
    eager, _ = LatentRuntime(model, 2, 600, cuda_graphs=False).generate(prompts, SamplingOptions(max_new_tokens=16))
    rt = LatentRuntime(model, 2, 600, cuda_graphs=True)
    graphed, _ = rt.generate(prompts, SamplingOptions(max_new_tokens=16))
    assert graphed == eager and sorted(rt._graphs) == [256, 512]


def test_filled_bucket():
    """The decode step's bound on the filled slots: the power of two above every row's length (the step adds one
    token), at least FILLED_BUCKET_MIN."""
    from kvconvert.runtime.engine import FILLED_BUCKET_MIN

    rt = LatentRuntime(tiny_clla(16), batch=2, capacity=8)
    for lengths, want in (([0, 0], FILLED_BUCKET_MIN), ([255, 3], 256), ([3, 256], 512), ([1000, 1023], 1024)):
        rt.lengths = lengths
        assert rt.filled_bucket() == want


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [8, 4, TAIL])
def test_cuda_runtime_matches_the_cpu_model(bits):
    """Triton kernels on CUDA (fp32 model, graphs on): the model's own teacher-forced logits, within tolerance."""
    model = tiny_clla(bits)
    ids = prompt(40, seed=8)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, 19:-1]
    rt = LatentRuntime(model.cuda(), 1, 64, cuda_graphs=True)
    got = teacher_forced(rt, ids[:-1], 20).cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits", [4, TAIL])
def test_cuda_rope_from_latent_matches_the_cpu_model(bits):
    """Rope keys reconstructed from the dequantized cache on CUDA (graphs on, a ring too): the model's logits."""
    model = tiny_clla(bits, rope_from_latent=True, rope_bits=16, **FROM_LATENT["per kv head"], **RING)
    ids = prompt(40, seed=8)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, 19:-1]
    for ring_chunk in (None, 4):
        rt = LatentRuntime(model.cuda(), 1, 64, cuda_graphs=True, ring_chunk=ring_chunk)
        got = teacher_forced(rt, ids[:-1], 20).cpu()
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-3
    model.cpu()


@pytest.mark.gpu
@needs_cuda
def test_cuda_sliding_window_ring_matches_the_cpu_model():
    """Rings on CUDA (Triton decode and append wrapping around, graphs on): the model's teacher-forced logits."""
    model = tiny_clla(4, **RING)
    ids = prompt(40, seed=8)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, 19:-1]
    rt = LatentRuntime(model.cuda(), 1, 64, cuda_graphs=True, ring_chunk=4)
    assert rt.cache.is_ring(1)
    got = teacher_forced(rt, ids[:-1], 20).cpu()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-3


def test_prefill_chunks_on_cuda_are_bounded_by_activations_and_mask():
    """Sizing only (no CUDA needed): a fresh prompt within 2^19 tokens over the batch is one causal piece; otherwise
    a chunk's additive mask (batch x chunk x context) stays within 2^29 values. The CPU bound is on the scores."""
    from types import SimpleNamespace

    def sizes(batch, lengths, total, device="cuda"):
        rt = SimpleNamespace(cache=SimpleNamespace(batch=batch), device=torch.device(device), lengths=lengths,
                             config=SimpleNamespace(num_attention_heads=9))
        return LatentRuntime.prefill_chunk_tokens(rt, total)

    assert sizes(64, [0] * 64, 8157) >= 8157  # SmolLM2's 8k context at batch 64: one piece
    assert sizes(1, [0], 1 << 19) == 1 << 19
    big = sizes(16, [0] * 16, 40_000)  # too long for one piece: masked chunks
    assert big < 40_000 and 16 * big * 40_000 <= 1 << 29
    later = sizes(16, [100] * 16, 8_257)  # a cache that is not empty always needs a mask
    assert 16 * later * 8_257 <= 1 << 29
    assert sizes(1, [0], 2048, "cpu") == (1 << 28) // (9 * 2048)


# Layer groups with latents of their own widths (CllaConfig.kv_latent_dims, kv_tail_dims; the planner's water_fill):
# a narrow group folds W_uk and W_uv into the projections while a wide one keeps them apart, and one group has no tail
UNEVEN = {"4+2": dict(kv_bits=4, rope_bits=4, kv_quant_group=8, kv_latent_dims=[16, 48, 32], kv_tail_dims=[0, 16, 8]),
          "16": dict(kv_bits=16, rope_bits=16, kv_latent_dims=[8, 48, 24]),
          "from latent": dict(kv_bits=4, kv_quant_group=8, kv_latent_dims=[16, 40, 24], kv_tail_dims=[8, 0, 16],
                              rope_from_latent=True, rope_bits=16, **FROM_LATENT["per kv head"])}


@pytest.mark.parametrize("plan", list(UNEVEN))
def test_latents_of_uneven_widths(plan):
    """Each group caches its own width: the cache holds exactly the formula's bytes, the model holds each group's
    shapes, and the runtime computes what the model computes."""
    model = tiny_clla(16, **(dict(qk_nope_dim=16) | UNEVEN[plan]))
    cfg = model.config
    assert cfg.uneven_latent and cfg.kv_latent_dim == max(cfg.kv_latent_dims)
    assert [p.kv_down.out_features for p in model.model.latent_proj] == cfg.kv_latent_dims
    assert [layer.self_attn.v_up.in_features for layer in model.model.layers] == [
        cfg.kv_latent_dims[g] for g in cfg.group_of_layer()]
    rt = LatentRuntime(model, batch=1, capacity=64)
    assert rt.cache.nbytes == kv_bytes_per_token(cfg) * 64
    for g, width in enumerate(cfg.kv_latent_dims):
        assert sum(s.width for s in rt.cache.latent_streams(g)) == width
        assert (rt.cache.tail(g) is None) == (cfg.kv_tail_dims[g] == 0)
    if plan != "from latent":  # (rope keys from the latent keep every W_uk: nothing to fold)
        assert len({lay.w_uv_t is None for lay in rt.layers}) == 2  # both output paths run
    assert_runtime_equals_model(rt, model, prompt(11, seed=1), 16, LOGIT_TOL[16 if plan == "16" else TAIL])


def test_uneven_latents_under_a_policy():
    """A cache policy moves and merges every group's streams, whatever their widths: with a budget above the context
    the tokens are those without a policy, and a tight budget holds."""
    from kvconvert.runtime.policies import make_policy

    model = tiny_clla(16, qk_nope_dim=16, **UNEVEN["4+2"])
    ids = prompt(20, seed=2)
    plain, _ = LatentRuntime(model, 1, 80).generate([ids], SamplingOptions(max_new_tokens=12))
    rt = LatentRuntime(model, 1, 80, policy=make_policy("zsmerge", 60), context=80)
    assert rt.generate([ids], SamplingOptions(max_new_tokens=12))[0] == plain
    rt = LatentRuntime(model, 1, 40, policy=make_policy("zsmerge", 10), context=200)
    out, _ = rt.generate([ids + prompt(20, seed=3)], SamplingOptions(max_new_tokens=12))
    assert rt.lengths == [10] and len(out[0]) == 12
