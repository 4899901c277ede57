"""`kvconvert chat`, `profile memory --measure` and `profile speed` through Typer's CliRunner on tiny models."""

import json

import pytest
import torch
from typer.testing import CliRunner

from kvconvert.cli import app
from kvconvert.config import kv_bytes_per_token
from kvconvert.loading import load_clla
from kvconvert.runtime.chat import ChatSession, chat_template_ids, common_prefix
from kvconvert.runtime import LatentRuntime, SamplingOptions

from conftest import save_source

runner = CliRunner()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Llama converted to a quarter of its KV cache (4-bit latent), and its source folder."""
    tmp = tmp_path_factory.mktemp("chat")
    src, _ = save_source(tmp, "llama")
    out = tmp / "clla"
    r = runner.invoke(app, ["convert", str(src), str(out), "--kv-ratio", "0.25", "--calib-tokens", "2048"])
    assert r.exit_code == 0, r.output
    return src, out


def greedy_reply(folder, text: str, n: int) -> str:
    """What the model's own generate answers to one templated user turn."""
    loaded = load_clla(folder)
    ids = chat_template_ids(loaded.tokenizer, [{"role": "user", "content": text}])
    stop = loaded.tokenizer.eos_token_id
    out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=stop)
    new = out[0, len(ids) :].tolist()
    if stop in new:
        new = new[: new.index(stop)]
    return loaded.tokenizer.decode(new, skip_special_tokens=True)


def test_chat_prompt_answers_like_the_model(converted):
    _, out = converted
    r = runner.invoke(app, ["chat", str(out), "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert j["reply"] == greedy_reply(out, "hello", 12)
    cfg = load_clla(out).model.config
    assert j["kv_bytes_in_use"] == j["cached_tokens"] * kv_bytes_per_token(cfg)
    assert 0 < j["new_tokens"] <= 12
    streamed = runner.invoke(app, ["chat", str(out), "--prompt", "hello", "--temperature", "0", "--max-new-tokens", "12"])
    assert streamed.exit_code == 0 and streamed.stdout.rstrip("\n") == j["reply"]


def test_chat_runs_a_source_model(converted):
    src, _ = converted
    r = runner.invoke(app, ["chat", str(src), "--prompt", "hi", "--max-new-tokens", "5", "--json", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["new_tokens"] > 0


def test_interactive_session_reset_and_stats(converted):
    _, out = converted
    r = runner.invoke(app, ["chat", str(out), "--temperature", "0", "--max-new-tokens", "4"], input="hello\n/stats\n/reset\n/stats\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("tokens in the cache") == 2
    assert "conversation cleared" in r.output
    assert "0 of " in r.stdout.split("tokens in the cache")[2]  # after /reset the cache is empty


def test_second_turn_reuses_the_cache(converted):
    """Turn two prefills only what the cache lacks, and answers as a fresh session given the whole history would."""
    _, out = converted
    loaded = load_clla(out)
    opts = SamplingOptions(max_new_tokens=6, stop_token_ids=(loaded.tokenizer.eos_token_id,))
    s = ChatSession(LatentRuntime(loaded.model, 1, 256), loaded.tokenizer)
    first, _ = s.reply("abc", opts)
    cached_before = list(s.cached)
    second, stats = s.reply("def", opts)
    rendered = chat_template_ids(s.tok, s.messages[:-1])
    keep = common_prefix(cached_before, rendered, len(rendered))
    assert keep > len(cached_before) // 2  # at least turn one's prompt stays cached
    assert stats.prompt_tokens == len(rendered) - keep  # only what the cache lacked was prefilled
    fresh = ChatSession(LatentRuntime(loaded.model, 1, 256), loaded.tokenizer)
    fresh.messages = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": first}]
    assert fresh.reply("def", opts)[0] == second


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--prompt", "x", "--device", "tpu"], "--device"),
        (["--prompt", "x", "--dtype", "int3"], "--dtype"),
        (["--json"], "--json needs --prompt"),
        (["--prompt", "x" * 300, "--context", "64"], "context full"),
    ],
)
def test_chat_bad_input(converted, args, needle):
    _, out = converted
    r = runner.invoke(app, ["chat", str(out), *args])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert needle in r.output


def test_profile_memory_measured_equals_predicted(converted):
    src, out = converted
    r = runner.invoke(app, ["profile", "memory", str(out), "--measure", "--source", str(src), "--context", "300", "--batch", "2", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    m = j["measured"]
    assert m["converted"]["kv_bytes_allocated"] == j["converted"]["kv_bytes_total"]
    # transformers caches in the model dtype (fp32 on CPU): twice the 16-bit figure
    assert m["source"]["kv_bytes_allocated"] == 2 * j["source"]["kv_bytes_total"]


def test_profile_speed_json(converted):
    src, out = converted
    r = runner.invoke(app, ["profile", "speed", str(out), "--source", str(src), "--batch", "1,2", "--context", "16", "--steps", "2", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    assert [(p["batch"], p["context"]) for p in j["points"]] == [(1, 16), (2, 16)]
    for p in j["points"]:
        rt, hf = p["runtime"], p["transformers"]
        assert rt["decode_tokens_per_s"] > 0 and hf["decode_tokens_per_s"] > 0 and rt["prefill_tokens_per_s"] > 0
        assert rt["bytes_per_step"] > 0 and rt["achieved_gb_per_s"] > 0
        for r in (rt, hf):  # the step against the measured roofline: a share, and which side bounds it
            assert r["flops_per_step"] > 0 and 0 < r["share_of_roofline"] and r["bound"] in ("memory", "compute")
            assert r["share_of_roofline"] == pytest.approx(max(
                r["bytes_per_step"] / (j["roofline"]["copy_gb_per_s"] * 1e9),
                r["flops_per_step"] / (j["roofline"]["matmul_tflop_per_s"] * 1e12)) / (r["decode_step_ms"] / 1e3))
    assert j["versions"]["torch"] == torch.__version__
