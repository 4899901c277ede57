"""The precision of a conversion's sampling and judging forwards (kvconvert/convert/precision.py)."""

import pytest
import torch

from kvconvert.convert import precision
from kvconvert.convert.build import Compressor
from kvconvert.convert.calibrate import collect_inputs
from kvconvert.convert.plan import HeadLogp, Overrides, RecallProbe, choose_plan, kl_to_source
from kvconvert.errors import KvconvertError

from conftest import VOCAB, tiny_source

CPU = torch.device("cpu")


def test_judge_dtype_names(monkeypatch):
    assert precision.judge_dtype("float32", CPU) == torch.float32
    assert precision.judge_dtype("bfloat16", CPU) == torch.bfloat16
    for speedup, expected in ((precision.BF16_MIN_SPEEDUP, torch.bfloat16), (1.0, torch.float32), (0.0, torch.float32)):
        monkeypatch.setattr(precision, "bf16_speedup", lambda device, s=speedup: s)
        assert precision.judge_dtype("auto", CPU) == expected
    with pytest.raises(KvconvertError, match="--judge-dtype must be one of"):
        precision.judge_dtype("float16", CPU)


def test_bf16_speedup_is_measured_once():
    precision.bf16_speedup.cache_clear()
    first = precision.bf16_speedup(CPU)
    assert first > 0 and precision.bf16_speedup(CPU) == first
    assert precision.bf16_speedup.cache_info().hits == 1


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


def test_the_planner_judges_in_the_dtype_it_is_given():
    """choose_plan's forwards (source and judged plans) all run in its dtype; the plan it picks is judged within
    bfloat16's rounding of what float32 measures for that plan."""
    src = tiny_source("llama", num_hidden_layers=4)
    with torch.no_grad():
        src.lm_head.weight.mul_(10)
    tokens = torch.randint(0, VOCAB, (18, 48), generator=torch.Generator().manual_seed(0))
    comp = Compressor(src, "llama", "tiny", collect_inputs(src, tokens[:-2]))
    dtypes = []
    hook = lambda m, i, o: dtypes.append(o.dtype)  # noqa: E731
    handle = src.model.layers[0].mlp.down_proj.register_forward_hook(hook)
    report = choose_plan(comp, 0.3, Overrides(), tokens[-2:], dtype=torch.bfloat16)
    handle.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the source's forwards (built plans share its MLPs)
    exact = kl_to_source(report.model, tokens[-2:], HeadLogp.of(src, tokens[-2:]))
    assert report.heldout_kl == pytest.approx(exact, rel=0.05, abs=1e-3)
