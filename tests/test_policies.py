"""Token-budget cache policies (ZSMerge, H2O, StreamingLLM) in the runtime: invariants on tiny models."""

import math

import pytest
import torch

from kvconvert.cache_layout import Stream
from kvconvert.kernels.reference import latent_decode_ref
from kvconvert.runtime import LatentRuntime, SamplingOptions
from kvconvert.runtime.policies import POLICIES, make_policy
from kvconvert.runtime.policies.base import RECONSTRUCT_POOL as POOL

from grids import grid
from test_runtime import FROM_LATENT, prompt, tiny_clla

NAMES = list(POLICIES)
MERGING = 0.02  # ZSMerge's merge slots (the authors' share; off by default): on wherever these tests run ZSMerge


def policy_of(name: str, budget: float, **kw):
    """make_policy, with ZSMerge's merge slots on unless `residual` is given."""
    if name == "zsmerge":
        kw.setdefault("residual", MERGING)
    return make_policy(name, budget, **kw)
# Rope keys cached (rotated when written) or reconstructed from the latent (rotated when read, at GroupState.rot)
ROPE = {"cached": {}, "from latent": dict(rope_from_latent=True, rope_bits=16, **FROM_LATENT["per kv head"])}


def run(model, prompts, policy, n=12, capacity=96, context=96):
    rt = LatentRuntime(model, len(prompts), capacity, policy=policy, context=context)
    out, _ = rt.generate(prompts, SamplingOptions(max_new_tokens=n))
    return out, rt


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rope", list(ROPE))
def test_budget_above_the_context_changes_nothing(name, rope):
    model = tiny_clla(4, **ROPE[rope])
    prompts = [prompt(20, seed=1)]
    plain, _ = run(model, prompts, None)
    with_policy, rt = run(model, prompts, policy_of(name, 60))  # 60 slots >= 20 + 12 tokens
    assert with_policy == plain
    assert rt.lengths == [31]


@pytest.mark.parametrize("name,bits,rope", grid(dict(name=NAMES, bits=[16, 4], rope=list(ROPE))))
def test_budget_is_never_exceeded(name, bits, rope):
    model = tiny_clla(bits, **ROPE[rope])
    budget = 10
    rt = LatentRuntime(model, 1, 40, policy=policy_of(name, budget), context=200)
    rt.prefill(torch.tensor([prompt(33, seed=2)]), [33])  # a prompt of 33 in chunks of 30: compressed twice
    assert rt.lengths == [budget] and rt.seen == [33]
    for t in range(25):
        rt.decode(torch.tensor([t]))
        assert rt.lengths == [budget] and int(rt.cache.seq_lens[0]) == budget
    assert rt.seen == [58] and int(rt.positions[0]) == 58
    st = rt.policy.states[0]
    if name == "zsmerge":
        # every token the row has seen is in exactly one slot: its own, or a merge slot's count
        assert math.isclose(float(st.weight[0, :budget].sum()), 58.0)
        assert int(st.residual[0, :budget].sum()) >= 1
    else:
        assert float(st.weight[0, :budget].sum()) == budget  # evicted tokens are gone
    kept = sorted(st.pos[0, :budget].tolist())
    recent, _ = rt.policy.split(budget)
    assert kept[-recent:] == list(range(58 - recent, 58))  # the recent window survives
    if name == "streaming":
        assert kept[:4] == [0, 1, 2, 3]  # the attention sinks survive


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rope", list(ROPE))
def test_padded_batch_equals_one_by_one(name, rope):
    model = tiny_clla(4, **ROPE[rope])
    prompts = [prompt(n, seed=10 + n) for n in (27, 9, 18)]
    batched, _ = run(model, prompts, policy_of(name, 12), n=10, capacity=48, context=64)
    for p, got in zip(prompts, batched):
        alone, _ = run(model, [p], policy_of(name, 12), n=10, capacity=48, context=64)
        assert got == alone[0]


def test_a_merged_slot_attends_like_its_tokens():
    """A slot standing for w identical tokens, with log(w) added to its scores, gives the w tokens' attention."""
    gen = torch.Generator().manual_seed(0)
    R, W = 32, 8
    tokens = torch.randn(1, 3, R + W, generator=gen)
    repeated = torch.cat((tokens, tokens[:, 2:].expand(1, 3, R + W)), 1)  # the last token four times
    q_lat, q_rope = torch.randn(1, 5, R, generator=gen), torch.randn(1, 5, W, generator=gen)

    def attend(x, log_w=None):
        lat = Stream(x[..., :R].half().float().contiguous(), None, 16, 1, R)
        rope = Stream(x[..., R:].half().float().contiguous(), None, 16, 1, W)
        lens = torch.tensor([x.shape[1]], dtype=torch.int32)
        return latent_decode_ref(q_lat, q_rope, lat, rope, lens, 0.3, log_weights=log_w)

    merged = attend(tokens, torch.log(torch.tensor([[1.0, 1.0, 4.0]])))
    assert torch.allclose(merged, attend(repeated), atol=1e-6)
    assert not torch.allclose(merged, attend(tokens), atol=1e-3)  # without the compensation it differs


def test_zsmerge_beats_eviction_on_a_repetitive_context():
    """Merging keeps information eviction drops: on a tiny model, ZSMerge's teacher-forced logits stay closer to the
    full cache's than H2O's and StreamingLLM's at the same budget (a bound a broken merge would miss)."""
    model = tiny_clla(16, kv_latent_dim=64, qk_nope_dim=16)
    ids = prompt(60, seed=5)

    def logits(policy):
        rt = LatentRuntime(model, 1, 96, policy=policy, context=96)
        out = [rt.prefill(torch.tensor([ids[:40]]), [40])[0]]
        out += [rt.decode(torch.tensor([t]))[0] for t in ids[40:]]
        return torch.stack(out)

    full = logits(None)
    err = {name: (logits(policy_of(name, 16)) - full).abs().mean().item() for name in NAMES}
    assert err["zsmerge"] < min(err["h2o"], err["streaming"]), err


@pytest.mark.parametrize("args, needle", [(("lru", 0.1), "--kv-policy"), (("zsmerge", 0), "--kv-budget")])
def test_bad_policy_options(args, needle):
    from kvconvert.errors import KvconvertError

    with pytest.raises(KvconvertError, match=needle):
        make_policy(*args)


def test_chat_and_eval_take_a_policy(tmp_path):
    """One flag switches chat and eval onto a policy; eval's runtime path with no policy ("full") equals the
    model's own teacher-forced perplexity, and a small budget changes it."""
    import json

    from typer.testing import CliRunner

    from kvconvert.cli import app

    from conftest import save_source

    src, _ = save_source(tmp_path, "llama")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    runner = CliRunner()
    r = runner.invoke(app, ["chat", str(src), "--prompt", "hello", "--max-new-tokens", "5", "--kv-policy", "zsmerge", "--kv-budget", "16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cached_tokens"] <= 16
    common = ["eval", str(src), "--text", str(text), "--window", "128", "--max-tokens", "256", "--json"]
    plain = json.loads(runner.invoke(app, common).stdout)["text"]
    full = runner.invoke(app, [*common, "--kv-policy", "full", "--score-last", "127"])
    assert full.exit_code == 0, full.output
    assert math.isclose(json.loads(full.stdout)["text"]["perplexity"], plain["perplexity"], rel_tol=2e-3)
    small = json.loads(runner.invoke(app, [*common, "--kv-policy", "streaming", "--kv-budget", "12", "--score-last", "64"]).stdout)
    ref = json.loads(runner.invoke(app, [*common, "--kv-policy", "full", "--score-last", "64"]).stdout)
    assert small["text"]["perplexity"] != ref["text"]["perplexity"]
    bad = runner.invoke(app, [*common, "--kv-policy", "lru"])
    assert bad.exit_code != 0 and "--kv-policy" in bad.output
    mem = json.loads(runner.invoke(app, ["profile", "memory", str(src), "--context", "1000", "--kv-policy", "zsmerge", "--kv-budget", "0.05", "--json"]).stdout)
    assert mem["kv_policy"]["slots_per_sequence"] == 50
    assert math.isclose(mem["kv_policy"]["ratio_to_source_full_cache"], mem["kv_ratio"] * 50 / 1000)


def test_policy_knobs_override_the_defaults():
    from kvconvert.errors import KvconvertError

    p = policy_of("zsmerge", 0.1, recent=0.25, residual=0.1, decay=0.9)
    assert (p.recent, p.residual, p.decay) == (0.25, 0.1, 0.9)
    assert p.split(100) == (25, 8)  # 25 recent, 10% of the other 75 (rounded) merge slots
    d = make_policy("zsmerge", 0.1)
    assert (d.recent, d.residual, d.decay) == (0.5, 0.0, 0.98)  # merge slots off by default
    with pytest.raises(KvconvertError, match="--kv-decay"):
        policy_of("h2o", 0.1, decay=1.5)
    assert policy_of("h2o", 0.1, queries=8).prefill_queries == 8 and d.prefill_queries == 512
    with pytest.raises(KvconvertError, match="--kv-queries"):
        policy_of("zsmerge", 0.1, queries=0)


@pytest.mark.parametrize("name", ["zsmerge", "h2o"])
def test_scoring_queries_choose_what_the_prompt_keeps(name):
    """--kv-queries: the prompt is scored by its last n queries only; n at or past the prompt's length is the default
    (every prompt query), fewer keep another cache."""
    model = tiny_clla(4)
    ids = [prompt(80, seed=3)]

    def kept(**kw):
        out, rt = run(model, ids, policy_of(name, 16, **kw), n=1)
        return out, torch.cat([s.pos.flatten() for s in rt.policy.states])

    default, every, few = kept(), kept(queries=80), kept(queries=2)
    assert default[0] == every[0] and torch.equal(default[1], every[1])
    assert not torch.equal(default[1], few[1])


def test_chat_turns_under_a_policy():
    """A second turn under a policy continues the compressed cache (the budget holds), and a turn whose history
    was re-tokenized differently starts over instead of reading a wrong prefix."""
    from kvconvert.runtime.chat import ChatSession, chat_template_ids

    from conftest import byte_tokenizer

    model = tiny_clla(4, vocab_size=260)
    tok = byte_tokenizer()
    rt = LatentRuntime(model, 1, 64 + 16, policy=policy_of("zsmerge", 16), context=400)
    s = ChatSession(rt, tok)
    opts = SamplingOptions(max_new_tokens=5)
    s.reply("first message, long enough to be compressed", opts)
    seen = rt.seen[0]
    assert rt.lengths[0] <= 16 and seen > 16
    _, stats = s.reply("second", opts)
    assert rt.lengths[0] <= 16
    assert rt.seen[0] == len(s.cached) > seen  # the token history the cache has seen, longer than after turn one
    rendered = chat_template_ids(tok, s.messages[:-1])
    assert s.cached[: len(rendered)] == rendered[: len(s.cached)]  # a prefix of the conversation, never stale
    rt.truncate(3)  # shorter than what was seen: under a policy, start over
    assert rt.seen == [0] and rt.lengths == [0]


@pytest.mark.parametrize("name", ["zsmerge", "h2o"])
def test_hold_stops_compressing_and_keeps_the_merged_slots(name):
    """kvpress's protocol (compress the prompt only): after hold() new tokens add slots and nothing is evicted or
    re-merged; the compressed prompt's slots, weights included, stay as they were."""
    model = tiny_clla(4)
    budget = 10
    rt = LatentRuntime(model, 1, 40, policy=policy_of(name, budget), context=200)
    rt.prefill(torch.tensor([prompt(30, seed=4)]), [30])
    assert rt.lengths == [budget]
    st = rt.policy.states[0]
    before = (st.pos[0, :budget].clone(), st.weight[0, :budget].clone())
    rt.policy.hold()
    rt.prefill(torch.tensor([prompt(20, seed=5)]), [20])
    for t in range(5):
        rt.decode(torch.tensor([t]))
    assert rt.lengths == [budget + 25] and rt.seen == [55]
    assert torch.equal(st.pos[0, :budget], before[0]) and torch.equal(st.weight[0, :budget], before[1])
    assert st.pos[0, budget : budget + 25].tolist() == list(range(30, 55))
    out, _ = rt.generate([prompt(3, seed=7)], SamplingOptions(max_new_tokens=2))  # chunked prefill while held
    assert rt.lengths == [budget + 25 + 3 + 1]  # the prompt and the first new token entered; nothing evicted
    rt.reset()  # a fresh conversation compresses again
    rt.prefill(torch.tensor([prompt(30, seed=4)]), [30])
    assert rt.lengths == [budget] and not rt.policy.held


def test_prompt_only_scoring_differs_from_holding_the_budget():
    """score_windows_with_policy(prompt_only=True) compresses the prompt alone: with a budget far below the scored
    span the two protocols differ, and the prompt-only one sees more of the text."""
    from kvconvert.evaluate import score_windows_with_policy

    model = tiny_clla(16)
    windows = torch.tensor([prompt(64, seed=6)])
    factory = lambda: policy_of("h2o", 8)  # noqa: E731
    held = score_windows_with_policy(model, windows, factory, score_last=32, chunk=8)
    prompt_only = score_windows_with_policy(model, windows, factory, score_last=32, chunk=8, prompt_only=True)
    full = score_windows_with_policy(model, windows, lambda: None, score_last=32, chunk=8)
    assert held["predictions"] == prompt_only["predictions"] == full["predictions"] == 32
    assert prompt_only["nll"] != held["nll"]
    assert abs(prompt_only["nll"] - full["nll"]) < abs(held["nll"] - full["nll"])


def full_and_budgeted(model, name: str, budget: int = 10):
    """The same 33-token prompt prefilled without a policy and under `name` (the first 30 tokens' layer inputs are
    the same in both: the budgeted run takes chunks of 30 then 3)."""
    ids = torch.tensor([prompt(33, seed=2)])
    full = LatentRuntime(model, 1, 64)
    full.prefill(ids, [33])
    rt = LatentRuntime(model, 1, 40, policy=policy_of(name, budget), context=200)
    rt.prefill(ids, [33])
    return full, rt


@pytest.mark.parametrize("name", NAMES)
def test_key_norms_move_with_their_slots(name):
    """A qk-norm model caches each layer's key norms per slot: a policy moves them with the latent (a kept token's
    norms are its own) and merges them like the rest (a merge slot's lie within its tokens')."""
    model = tiny_clla(4, qk_norm=True)
    full, rt = full_and_budgeted(model, name)
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        st = rt.policy.states[cfg.group_of_layer()[i]]
        want, got = full.cache.key_scale(i).data[0, :33], rt.cache.key_scale(i).data[0, :10]
        for s in range(10):
            p = int(st.pos[0, s])
            if bool(st.residual[0, s]):
                assert (got[s] >= want.min(0).values - 1e-3).all() and (got[s] <= want.max(0).values + 1e-3).all()
            elif p < 30:
                assert torch.equal(got[s], want[p]), (i, s, p)
    assert int((rt.policy.states[0].pos[0, :10] < 30).sum()) >= 4  # the check above had slots to look at


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rope", list(FROM_LATENT))
def test_reconstructed_rope_keys_rotate_at_their_slots_positions(name, rope):
    """Rope keys from the latent under a policy: a kept slot's reconstructed keys are exactly those its token has
    without a policy (its own latent, rotated at its own position, wherever compaction moved it); a merge slot
    rotates at its tokens' count-weighted mean position, so Σ count × position over the slots is the sum of every
    position seen (each token sits in exactly one slot)."""
    model = tiny_clla(4, rope_from_latent=True, rope_bits=16, **FROM_LATENT[rope])
    full, rt = full_and_budgeted(model, name)
    cfg = model.config
    after = torch.tensor([33])
    checked = 0
    for g, layers in enumerate(cfg.layer_groups):
        st = rt.policy.states[g]
        lat_full, rot_full = full._read_group(g, 33, after)
        lat, rot = rt._read_group(g, 10, after)
        for i in layers:
            want, got = full._layer_rope(i, lat_full, rot_full), rt._layer_rope(i, lat, rot)
            for s in range(10):
                p = int(st.pos[0, s])
                if not bool(st.residual[0, s]) and p < 30:
                    assert float(st.rot[0, s]) == p
                    assert torch.equal(got[:, :, s], want[:, :, p]), (i, s, p)
                    checked += 1
        if name == "zsmerge":
            assert math.isclose(float((st.weight[0, :10] * st.rot[0, :10]).sum()), sum(range(33)), rel_tol=1e-6)
            assert bool(st.residual[0, :10].any())
    assert checked >= 4 * cfg.num_hidden_layers  # the comparison above had slots to look at
    for t in range(12):  # decode under the budget goes on reading them
        rt.decode(torch.tensor([t]))
    assert rt.lengths == [10]
    if name == "zsmerge":
        st = rt.policy.states[0]
        assert math.isclose(float((st.weight[0, :10] * st.rot[0, :10]).sum()), sum(range(45)), rel_tol=1e-6)


def test_head_granularity_reference_reproduces_the_runtime():
    """The policies' reference (runtime/policies/reference.py, bench.studies.head_granularity's rows): its group-level
    rows are the runtime's ZSMerge and zsmerge:residual=0 under kvpress's protocol (prompt compressed once), so its
    head-level rows differ from the runtime by the granularity alone."""
    from kvconvert.convert.identity import build_identity
    from kvconvert.evaluate import score_windows_with_policy
    from kvconvert.runtime.policies.reference import METHODS, window_nll

    from conftest import tiny_source

    src = tiny_source("llama", seed=1)
    clla = build_identity(src, "llama", "tiny")
    W, ctx, budget = 96, 64, 0.25
    ids = torch.tensor([prompt(W, seed=5)])
    policy = policy_of("zsmerge", budget)
    keep = policy.slots(W)
    recent, merge_slots = policy.split(keep)
    ref = window_nll(src, ids, ctx, list(METHODS), keep, recent, merge_slots, policy.decay, policy.prefill_queries)
    runtime = {
        "full": lambda: None,
        "zsmerge/group": lambda: policy_of("zsmerge", budget),
        "h2o/group": lambda: policy_of("zsmerge", budget, residual=0.0),
    }
    for name, factory in runtime.items():
        got = score_windows_with_policy(clla, ids, factory, W - ctx, prompt_only=True)["nll"]
        assert abs(got - ref[name]) <= 1e-3 * ref[name], (name, got, ref[name])
    assert len({round(v, 6) for v in ref.values()}) == len(ref)  # every method keeps a different cache


def test_compare_policies_pairs_passkey_trials(tmp_path):
    """bench.compare_policies (kvconvert.paired_comparison) compares per-trial passkey outcomes trial by trial (wins,
    losses, exact McNemar)."""
    import json

    from kvconvert.paired_comparison import compare_passkey, mcnemar, methods_at_budget

    def row(policy, budget, passed):
        return {"model": "source", "policy": policy, "budget": budget, "window_nll": None,
                "passkey_passed": {"2048": passed}}

    T, F = True, False
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": [row("full", 1.0, [T, T, T, T, T, T]), row("zsmerge", 0.25, [T, F, F, F, T, F]),
                                         row("h2o", 0.25, [T, T, T, F, F, F]), row("h2o", 0.05, [F] * 6)]}))
    found = methods_at_budget([str(path)], 0.25, "source")
    assert set(found) == {"full", "kvconvert zsmerge", "kvconvert h2o"}  # the 5% row is another budget
    got = {r["method"]: r for r in compare_passkey(found, "kvconvert zsmerge")}
    h2o = got["kvconvert h2o"]
    assert (h2o["wins"], h2o["losses"], h2o["accuracy"]) == (2, 1, 0.5)
    assert (got["full"]["wins"], got["full"]["losses"]) == (4, 0)
    assert got["full"]["p"] == mcnemar(4, 0) == 2 / 16 and mcnemar(2, 1) == 1.0 and mcnemar(0, 0) == 1.0
    assert mcnemar(0, 10) == 2 / 1024


def test_for_context_sizes_the_cache_for_the_budget_and_one_prefill_chunk():
    """LatentRuntime.for_context: a cache of `context` slots without a policy; with one, its budget of the context
    plus one prefill chunk, and prefill_chunked compresses after every chunk of that many tokens."""
    from kvconvert.errors import KvconvertError

    model = tiny_clla(4)
    full = LatentRuntime.for_context(model, 2, 64)
    assert full.cache.capacity == 64 and full.context == 64 and full.prefill_chunk is None
    rt = LatentRuntime.for_context(model, 1, 200, policy_of("zsmerge", 0.1), prefill_chunk=16)
    assert rt.cache.capacity == 20 + 16 and rt.context == 200 and rt.prefill_chunk == 16
    steps = []
    prefill = rt.prefill
    rt.prefill = lambda ids, n_new, **kw: steps.append(ids.shape[1]) or prefill(ids, n_new, **kw)
    rt.prefill_chunked(torch.tensor([prompt(50, seed=4)]), [50])
    assert steps == [16, 16, 16, 2] and rt.lengths == [20] and rt.seen == [50]
    with pytest.raises(KvconvertError, match="too small"):
        LatentRuntime.for_context(model, 1, 20, policy_of("zsmerge", 0.1))


def _identity_llama():
    from kvconvert.convert.identity import build_identity

    from conftest import tiny_source

    src = tiny_source("llama", seed=3, attn_implementation="eager")
    return src, build_identity(src, "llama", "tiny")


def test_reconstruction_scores_are_the_strongest_attention_of_the_reading():
    """score_by_reconstruction: each prompt slot's score is the most attention any query of a reading (the repeat
    instruction, then a chunk of the prompt again, placed after the prompt) gives it, in any head and layer of its
    group, over all the chunks: checked against the source's own eager attention weights."""
    src, clla = _identity_llama()
    ids, repeat, chunk = prompt(40, seed=7), prompt(5, seed=8), 16
    policy = policy_of("h2o", 10, score="reconstruct")
    rt = LatentRuntime(clla, 1, 10 + 40 + 5 + chunk, policy=policy, context=48)
    rt.score_by_reconstruction(ids, repeat, chunk)
    expected = torch.zeros(clla.config.num_layer_groups, 40)
    for lo in range(0, 40, chunk):
        part = repeat + ids[lo : lo + chunk]
        att = src(torch.tensor([ids + part]), output_attentions=True).attentions
        for i, a in enumerate(att):  # (1, heads, T, T): the reading's queries, the prompt's keys
            g = clla.config.group_of_layer()[i]
            expected[g] = torch.maximum(expected[g], a[0, :, 40:, :40].amax((0, 1)))
    got = torch.stack([st.score[0, :40] for st in policy.states])
    pooled = torch.stack([expected[:, max(0, t - POOL // 2) : t + POOL // 2 + 1].amax(1) for t in range(40)], 1)
    torch.testing.assert_close(got, pooled.mean(0).expand_as(got), atol=2e-5, rtol=1e-4)
    assert clla.config.num_layer_groups > 1 and not torch.equal(pooled[0], pooled[1])  # the mean is not one group's


def test_a_reconstruction_reading_leaves_the_cache_as_a_plain_prefill():
    """The readings are dropped: slots, token counts and positions are a plain prefill's, bit for bit; compressing
    then brings the row to its budget, and decoding goes on from the prompt's end."""
    _, clla = _identity_llama()
    ids, repeat = prompt(40, seed=9), prompt(5, seed=10)
    plain = LatentRuntime(clla, 1, 64, policy=policy_of("zsmerge", 12), context=64)
    plain.policy.hold()
    want = plain.prefill(torch.tensor([ids]), [40])
    rt = LatentRuntime(clla, 1, 12 + 40 + 5 + 16, policy=policy_of("zsmerge", 12, score="reconstruct"), context=64)
    got = rt.score_by_reconstruction(ids, repeat, chunk=16)
    assert torch.equal(got, want)
    assert rt.lengths == rt.seen == [40] and int(rt.positions[0]) == int(rt.cache.seq_lens[0]) == 40
    for g in range(clla.config.num_layer_groups):
        for a, b in zip(rt.cache.group_streams(g), plain.cache.group_streams(g)):
            assert torch.equal(a.data[:, :40], b.data[:, :40])
    assert not rt.policy.held and not rt.policy.collecting
    rt.compress()
    assert rt.lengths == [12]
    rt.decode(torch.tensor([3]))
    assert rt.seen == [41] and int(rt.positions[0]) == 41


@pytest.mark.parametrize("score", ["attention", "reconstruct"])
def test_query_agnostic_generation_compresses_the_context_before_the_question(score):
    """runtime_generator with `context`: the haystack alone is compressed to the budget; the question and the reply
    are added after it uncompressed (kvpress's protocol). A budget above the haystack gives the full cache's reply."""
    from kvconvert.evaluate import runtime_generator

    _, clla = _identity_llama()
    ids, question, n = prompt(48, seed=11), prompt(6, seed=12), 8
    made = []

    def factory(budget):
        made.append(policy_of("h2o", budget, score=score))
        return made[-1]

    full = runtime_generator(clla, lambda: None)(ids + question, n)
    roomy = runtime_generator(clla, lambda: factory(60), repeat=[1, 2])(ids + question, n, context=48)
    assert roomy == full
    runtime_generator(clla, lambda: factory(16), repeat=[1, 2])(ids + question, n, context=48)
    st = made[-1].states[0]
    kept = st.pos[0, : 16 + 6 + n - 1].tolist()
    assert made[-1].held
    assert sum(p < 48 for p in kept) == 16  # the haystack at its budget
    assert kept[16:] == list(range(48, 48 + 6 + n - 1))  # the question and the reply, every token



def _held(st, streams, lengths, b):
    """Row b's slots (the first lengths[b]) as (pos, rot)-sorted state and dequantized values: what a row holds,
    whatever the order of its slots."""
    from kvconvert.kernels import dequantize_streams
    n = lengths[b]
    values = dequantize_streams([s.rows(slice(b, b + 1)) for s in streams], n, torch.float32)[0]
    pick = torch.tensor(sorted(range(n), key=lambda s: (int(st.pos[b, s]), float(st.rot[b, s]))))
    return {k: getattr(st, k)[b, :n][pick] for k in ("pos", "weight", "score", "residual", "rot")} | {"values": values[pick]}


@pytest.mark.parametrize("name,bits,rope", grid(dict(name=NAMES, bits=[16, 4], rope=list(ROPE))))
def test_the_batched_decode_eviction_keeps_what_the_per_row_one_keeps(name, bits, rope, monkeypatch):
    """A decode step one slot over the budget evicts on the device for all rows at once (evict_one, no host sync):
    from the same state, the same tokens kept, merged and weighted, bit for bit, as by the per-row path, only in
    another slot order. Row 1 reaches the budget during decode (its first compression, which opens ZSMerge's merge
    slots, is not a steady one). Checked at every steady step of a per-row run, on copies of its state."""
    from kvconvert.runtime.policies.base import GroupState
    model = tiny_clla(bits, **ROPE[rope])
    policy = policy_of(name, 12)
    policy.batched_step = False
    per_row, checked, steady = type(policy).compress, [], {}

    def compress(self, g, streams, lengths, seen):
        if g == 0:  # decided once per step, before any group compresses (as the runtime does)
            self.batched_step = True
            steady["now"], self.batched_step = self.steady(lengths), False
        if not steady["now"]:
            return per_row(self, g, streams, lengths, seen)
        mine = GroupState(*(t.clone() for t in self.states[g].tensors()))
        copies = [Stream(s.data.clone(), None if s.scales is None else s.scales.clone(), s.bits, s.group, s.width)
                  for s in streams]
        theirs, self.states[g] = self.states[g], mine
        self.evict_one(g, copies, torch.tensor(lengths, dtype=torch.int32), torch.tensor(seen, dtype=torch.int32))
        self.states[g] = theirs
        out = per_row(self, g, streams, lengths, seen)
        for b in range(len(lengths)):
            want, got = _held(theirs, streams, out, b), _held(mine, copies, out, b)
            for k in want:
                assert torch.equal(got[k], want[k]), (g, b, k)
        checked.append(g)
        return out

    monkeypatch.setattr(type(policy), "compress", compress)
    run(model, [prompt(33, seed=4), prompt(8, seed=5)], policy, n=16, capacity=40, context=64)
    assert len(checked) >= 10 * model.config.num_layer_groups


@pytest.mark.parametrize("name", NAMES)
def test_a_run_with_the_batched_eviction_matches_the_per_row_run(name):
    """End to end, the batched decode eviction gives the per-row run's tokens and keeps the same tokens (the two
    differ in slot order only: sums in another order, equal to rounding)."""
    model = tiny_clla(4)
    runs = {}
    for batched in (False, True):
        policy = policy_of(name, 12)
        policy.batched_step = batched
        runs[batched] = run(model, [prompt(33, seed=4), prompt(8, seed=5)], policy, n=16, capacity=40, context=64)
    (out_rows, rows), (out_batched, batched) = runs[False], runs[True]
    assert out_batched == out_rows and batched.lengths == rows.lengths == [12, 12]
    for g in range(model.config.num_layer_groups):
        for b in range(2):
            want = _held(rows.policy.states[g], rows.cache.group_streams(g), rows.lengths, b)
            got = _held(batched.policy.states[g], batched.cache.group_streams(g), batched.lengths, b)
            for k in ("pos", "weight", "residual"):
                assert torch.equal(got[k], want[k]), (g, b, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_a_steady_eviction_makes_no_host_sync(name):
    """On CUDA, a steady step's policy work (observe, evict_one, the lengths) runs with syncs made errors."""
    model = tiny_clla(4).cuda()
    rt = LatentRuntime(model, 2, 40, policy=policy_of(name, 12), context=64, cuda_graphs=False)
    rt.generate([prompt(33, seed=4), prompt(30, seed=5)], SamplingOptions(max_new_tokens=4))  # both rows at the budget
    assert rt.policy.steady([n + 1 for n in rt.lengths])
    apply = rt._apply_policy

    def strict(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            apply(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    rt._apply_policy = strict
    for t in range(3):
        rt.decode(torch.tensor([t, t + 1], device="cuda"))
    assert rt.lengths == [12, 12]
