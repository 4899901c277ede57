"""`kvconvert eval --long`: the suite paired with a reference, long-window perplexity, chat agreement; bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from kvconvert.chat_fidelity import chat_agreement, chat_prompts, first_sentence
from kvconvert.cli import app
from kvconvert.errors import KvconvertError
from kvconvert.evaluate import score_windows
from kvconvert.longcontext import TASKS, long_perplexity, prompt_length, suite_lengths

from conftest import byte_tokenizer, save_source, tiny_source
from test_cli_errors import assert_one_line_error

runner = CliRunner()
TEXT = " ".join(f"Sentence number {i} tells of the {['red', 'green', 'blue'][i % 3]} house by the lake." for i in range(60))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama source and its conversion to a quarter of the cache."""
    tmp = tmp_path_factory.mktemp("long")
    src, _ = save_source(tmp, "llama")
    out = tmp / "clla"
    assert run("convert", src, out, "--kv-ratio", "0.25", "--calib-tokens", "1024").exit_code == 0
    text = tmp / "text.txt"
    text.write_text(TEXT)
    return src, out, text


def long_json(*args) -> dict:
    r = run("eval", *args, "--long", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])["long"]


def test_a_model_paired_with_itself_is_all_of_its_reference(folders):
    src, _, text = folders
    r = long_json(src, "--reference", src, "--lengths", "400,512", "--trials", "2", "--text", text, "--chat", "2")
    assert [(row["task"], row["length"]) for row in r["suite"]] == [(t, n) for t in TASKS for n in (400, 512)]
    for row in r["suite"]:
        assert row["trials"] == 2 and len(row["passed"]) == 2
        assert row["prompt_tokens"] <= prompt_length(row["length"], 512)
        assert row["wins"] == row["losses"] == 0 and row["p"] == 1.0
        assert row["accuracy"] == row["reference_accuracy"]
    assert [p["length"] for p in r["perplexity"]] == [400, 512]
    for p in r["perplexity"]:
        assert p["perplexity_ratio"] == 1.0 and p["top1_agreement"] == 1.0 and abs(p["kl"]) < 1e-6
        assert p["scored_per_window"] == p["length"] // 4
    assert r["chat"]["top1_agreement"] == 1.0 and r["chat"]["first_sentence_match"] == 1.0
    assert r["haystack"] == "text"


def test_a_conversion_against_its_source(folders):
    src, out, text = folders
    r = long_json(out, "--reference", src, "--lengths", "512", "--trials", "3", "--tasks", "single,variables",
                  "--text", text, "--chat", "0")
    assert [row["task"] for row in r["suite"]] == ["single", "variables"] and "chat" not in r
    (p,) = r["perplexity"]
    assert p["perplexity_ratio"] != 1.0 and 0 < p["top1_agreement"] <= 1 and p["kl"] > 0
    assert r["haystack"] == "text"


def test_under_a_cache_policy_the_reference_keeps_its_full_cache(folders):
    src, out, _ = folders
    r = long_json(out, "--reference", src, "--lengths", "512", "--trials", "2", "--tasks", "single",
                  "--kv-policy", "zsmerge", "--kv-budget", "0.5")
    assert r["haystack"] == "generated" and r["chat_skipped"]
    (row,) = r["suite"]
    assert row["trials"] == 2 and row["reference_accuracy"] is not None


def test_long_window_perplexity_scores_the_last_quarter():
    tok = byte_tokenizer()
    model = tiny_source("llama")
    r = long_perplexity(model, tok, TEXT, 256, 1024)
    ids = torch.tensor(tok(TEXT, add_special_tokens=False).input_ids[:1024]).view(4, 256)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, 191:-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 192:, None]).mean().item()
    assert r["windows"] == 4 and r["predictions"] == 4 * 64
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    other = tiny_source("llama", seed=1)
    paired = long_perplexity(model, tok, TEXT, 256, 1024, reference=other)
    assert paired["nll"] == r["nll"]
    assert paired["reference_perplexity"] == pytest.approx(long_perplexity(other, tok, TEXT, 256, 1024)["perplexity"], rel=1e-6)
    assert paired["perplexity_ratio"] == pytest.approx(paired["perplexity"] / paired["reference_perplexity"], rel=1e-12)
    with pytest.raises(KvconvertError, match="last 1..255"):
        score_windows(model, ids, score_last=256)


def test_lengths_default_to_what_the_positions_allow():
    assert suite_lengths(None, 8192) == [1024, 2048, 4096, 8192]
    assert suite_lengths(None, 3000) == [1024, 2048]
    assert suite_lengths(None, 512) == [512]
    assert suite_lengths([700], 8192) == [700]
    with pytest.raises(KvconvertError, match="above the model's 512 positions"):
        suite_lengths([1024], 512)
    assert prompt_length(8192, 8192) == 8192 - 32 and prompt_length(1024, 8192) == 1024


def test_chat_prompts_are_seeded_and_distinct():
    a = chat_prompts(20, seed=3)
    assert a == chat_prompts(20, seed=3) and a != chat_prompts(20, seed=4) and len(set(a)) == 20
    assert chat_prompts(5, seed=3) == a[:5]
    with pytest.raises(KvconvertError, match="at most"):
        chat_prompts(1000)


def test_first_sentence():
    assert first_sentence("  The capital of France is Paris. It is big.") == "The capital of France is Paris."
    assert first_sentence("Sure!\nHere are three tips") == "Sure!"
    assert first_sentence("3.5 is a number. Yes") == "3.5 is a number."
    assert first_sentence("no end") == "no end"


def test_chat_agreement_sees_another_model():
    tok = byte_tokenizer()
    a, b = tiny_source("llama", seed=0), tiny_source("llama", seed=1)
    same = chat_agreement(a, a, tok, n_prompts=2, max_new_tokens=12)
    assert same["top1_agreement"] == 1.0 and same["first_sentence_match"] == 1.0 and same["answer_tokens"] > 0
    other = chat_agreement(b, a, tok, n_prompts=2, max_new_tokens=12)
    assert other["top1_agreement"] < 0.5 and other["answer_tokens"] == same["answer_tokens"]
    for r in (same, other):  # the margin bins split the answer tokens, and their agreement adds up to the whole
        bins = r["by_reference_margin"]
        assert sum(b["tokens"] for b in bins) == r["answer_tokens"]
        assert sum(b["top1_agreement"] * b["tokens"] for b in bins) == pytest.approx(r["top1_agreement"] * r["answer_tokens"])
    assert all(b["top1_agreement"] == 1.0 for b in same["by_reference_margin"])


def test_chat_agreement_bins_tokens_by_the_reference_margin():
    from kvconvert.chat_fidelity import by_margin

    margins = torch.tensor([0.1, 0.4, 0.5, 0.9, 1.5, 2.0, 7.0])
    hits = torch.tensor([False, True, True, True, False, True, True])
    assert by_margin(margins, hits) == [
        {"margin_from": 0.0, "margin_to": 0.5, "tokens": 2, "top1_agreement": 0.5},
        {"margin_from": 0.5, "margin_to": 1.0, "tokens": 2, "top1_agreement": 1.0},
        {"margin_from": 1.0, "margin_to": 2.0, "tokens": 1, "top1_agreement": 0.0},
        {"margin_from": 2.0, "margin_to": None, "tokens": 2, "top1_agreement": 1.0},
    ]
    assert by_margin(torch.tensor([3.0]), torch.tensor([True])) == [
        {"margin_from": 2.0, "margin_to": None, "tokens": 1, "top1_agreement": 1.0}]  # empty bins left out


@pytest.mark.parametrize("args, needle", [
    (("--lengths", "1024"), "above the model's 512 positions"),
    (("--tasks", "single,needles"), "unknown --tasks needles"),
    (("--trials", "0"), "--trials"),
    (("--lengths", "512", "--text", "SHORT", "--window", "16"), "too short a haystack"),
])
def test_bad_suite_requests_are_one_line(folders, tmp_path, args, needle):
    src, _, _ = folders
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here. Not enough.")
    args = tuple(str(short) if a == "SHORT" else a for a in args)
    assert_one_line_error(run("eval", src, "--long", *args), needle)
