"""The precision of a conversion's sampling and judging forwards (kvconvert/convert/precision.py)."""

import pytest
import torch

from kvconvert.convert import precision
from kvconvert.convert.build import Compressor
from kvconvert.convert.calibrate import collect_inputs
from kvconvert.convert.plan import HeadLogp, Overrides, RecallProbe, choose_plan, kl_to_source
from kvconvert.errors import KvconvertError

from conftest import VOCAB, save_source, tiny_source

CPU = torch.device("cpu")


def test_judge_dtype_names(monkeypatch):
    assert precision.judge_dtype("float32", CPU) == torch.float32
    assert precision.judge_dtype("bfloat16", CPU) == torch.bfloat16
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "native_bf16", lambda device, n=native: n)
        assert precision.judge_dtype("auto", CPU) == expected
        assert precision.judge_dtype("float32", CPU) == torch.float32  # an explicit choice is kept
    with pytest.raises(KvconvertError, match="--judge-dtype must be one of"):
        precision.judge_dtype("float16", CPU)


def test_float32_forwards_stay_float32_inside_an_enclosing_autocast():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with precision.forwards_in(torch.float32, CPU):
            assert (a @ b).dtype == torch.float32
        with precision.forwards_in(torch.bfloat16, CPU):
            assert (a @ b).dtype == torch.bfloat16


def test_a_bfloat16_judge_runs_in_bfloat16_and_stays_near_the_float32_one():
    """The judge's KLs under bfloat16 differ from float32's (autocast reached the forwards) by no more than
    bfloat16's rounding explains: a few percent of a KL well above it."""
    src = tiny_source("llama", num_hidden_layers=4)
    with torch.no_grad():
        src.lm_head.weight.mul_(10)  # sharper outputs: KLs well above rounding
    other = tiny_source("llama", seed=1, num_hidden_layers=4)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    seen = []
    other.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    f32 = kl_to_source(other, ids, HeadLogp.of(src, ids))
    b16 = kl_to_source(other, ids, HeadLogp.of(src, ids, dtype=torch.bfloat16), dtype=torch.bfloat16)
    assert seen == [torch.float32, torch.bfloat16]
    assert f32 > 0.1 and b16 != f32 and b16 == pytest.approx(f32, rel=0.05)

    rows = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(4))
    rows[:, 80:] = rows[:, :16]  # [A, filler, A]
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask[:, 81:] = True
    probe = RecallProbe.from_rows(rows, mask)
    f32 = probe.kl(other, probe.logp(src))
    b16 = probe.kl(other, probe.logp(src, torch.bfloat16), torch.bfloat16)
    assert f32 > 0.1 and b16 != f32 and b16 == pytest.approx(f32, rel=0.05)


def test_the_planner_judges_every_forward_in_the_dtype_it_is_given(monkeypatch):
    """choose_plan's forwards, the source's and each judged plan's, on held-out and probe rows, all take its dtype;
    the plan it picks is judged within bfloat16's rounding of what float32 measures for that plan."""
    src = tiny_source("llama", num_hidden_layers=4)
    with torch.no_grad():
        src.lm_head.weight.mul_(10)
    tokens = torch.randint(0, VOCAB, (18, 48), generator=torch.Generator().manual_seed(0))
    comp = Compressor(src, "llama", "tiny", collect_inputs(src, tokens[:-2]))
    rows = torch.stack([torch.cat([tokens[i], tokens[i + 3], tokens[i]]) for i in range(3)])  # [A, filler, A]
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask[:, 97:] = True
    calls = []
    of = HeadLogp.of.__func__
    monkeypatch.setattr(HeadLogp, "of", classmethod(
        lambda cls, model, ids, positions=None, dtype=torch.float32: (calls.append((model is src, ids.shape, dtype)),
                                                                      of(cls, model, ids, positions, dtype))[1]))
    report = choose_plan(comp, 0.3, Overrides(), tokens[-2:], probe=RecallProbe.from_rows(rows, mask),
                         dtype=torch.bfloat16)
    monkeypatch.undo()
    assert {d for _, _, d in calls} == {torch.bfloat16}
    assert any(s for s, _, _ in calls) and any(not s for s, _, _ in calls)  # the source and the plans
    assert {shape[1] for _, shape, _ in calls} == {48, 144}  # held-out rows and probe rows
    exact = kl_to_source(report.model, tokens[-2:], HeadLogp.of(src, tokens[-2:]))
    assert report.heldout_kl == pytest.approx(exact, rel=0.05, abs=1e-3)


def test_a_conversion_samples_and_judges_in_bfloat16_and_fits_in_float32(tmp_path, monkeypatch):
    """`--judge-dtype bfloat16`: sampling and the judge under autocast; the statistics' forward, the build of each
    plan (its fits) and the logit check before export without it."""
    import kvconvert.convert.pipeline as pipeline
    from kvconvert.convert import build, calibrate

    src, _ = save_source(tmp_path, "llama")
    seen: dict[str, set] = {}

    def spy(owner, name):
        real = getattr(owner, name)

        def call(*a, **k):
            seen.setdefault(name, set()).add(torch.is_autocast_enabled("cpu"))
            return real(*a, **k)
        monkeypatch.setattr(owner, name, call)

    spy(pipeline, "sample_tokens")
    spy(pipeline, "collect_inputs")
    spy(pipeline, "max_relative_logit_error")
    spy(build.Compressor, "build")
    spy(calibrate, "moment")
    record = pipeline.convert(src, tmp_path / "out", pipeline.ConvertOptions(kv_ratio=0.3, calib_tokens=512,
                                                                             judge_dtype="bfloat16"))
    assert record["judge_dtype"] == "bfloat16"
    assert seen == {"sample_tokens": {True}, "collect_inputs": {False}, "max_relative_logit_error": {False},
                    "build": {False}, "moment": {False}}
