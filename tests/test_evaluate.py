"""Evaluation numbers checked against independent computations on tiny models."""

import json
import math

import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kvconvert.cli import app
from kvconvert.evaluate import PASSKEY_QUESTION, passkey_accuracy, passkey_prompt, score_windows, text_windows

from conftest import VOCAB, save_source, tiny_source

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40


def test_text_windows_protocol(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    w = text_windows(tokenizer, TEXT, window=100, max_tokens=1050)
    assert w.shape == (10, 100)  # 1050 tokens read, the partial 11th window dropped
    assert w.flatten().tolist() == ids[:1000]  # no BOS, consecutive, non-overlapping
    assert w[0, 0].item() == tokenizer.convert_tokens_to_ids("I")


@torch.no_grad()
def test_perplexity_matches_hf_loss():
    model = tiny_source("llama")
    windows = torch.randint(0, VOCAB, (5, 33), generator=torch.Generator().manual_seed(0))
    ours = score_windows(model, windows, batch_size=2)
    # Independent: transformers' own shifted cross-entropy per window; equal-length windows so the mean is fair.
    losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert ours["predictions"] == 5 * 32
    assert math.isclose(ours["perplexity"], math.exp(sum(losses) / len(losses)), rel_tol=1e-5)


@torch.no_grad()
def test_agreement_and_kl_match_direct_computation():
    model, ref = tiny_source("qwen2", seed=0), tiny_source("qwen2", seed=1)
    windows = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    ours = score_windows(model, windows, reference=ref, batch_size=3)
    lm = F.log_softmax(model(windows).logits[:, :-1], -1).reshape(-1, VOCAB)
    lr = F.log_softmax(ref(windows).logits[:, :-1], -1).reshape(-1, VOCAB)
    kl = F.kl_div(lm, lr, log_target=True, reduction="batchmean").item()  # KL(ref || model)
    agree = (lm.argmax(-1) == lr.argmax(-1)).float().mean().item()
    assert math.isclose(ours["kl"], kl, rel_tol=1e-4)
    assert ours["kl"] > 0.01  # two different random models really disagree
    assert math.isclose(ours["top1_agreement"], agree, rel_tol=1e-9)
    same = score_windows(model, windows, reference=model)
    assert same["top1_agreement"] == 1.0 and abs(same["kl"]) < 1e-6


def test_passkey_prompt_length_and_key(tokenizer):
    for length in (600, 2000):
        ids = passkey_prompt(tokenizer, length, 48213, depth=0.5)
        assert abs(len(ids) - length) <= 0.05 * length
        assert "The pass key is 48213." in tokenizer.decode(ids)
        assert tokenizer.decode(ids).endswith("The pass key is")


class Oracle(torch.nn.Module):
    """Answers with the key found in the prompt (or a wrong one): checks the scoring, not a model."""

    def __init__(self, tokenizer, wrong: bool):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.wrong = tokenizer, wrong

    def generate(self, ids, **kw):
        import re

        key = re.search(r"pass key is (\d+)", self.tokenizer.decode(ids[0])).group(1)
        answer = str(int(key) + 1) if self.wrong else key
        extra = torch.tensor([self.tokenizer(" " + answer + ".", add_special_tokens=False)["input_ids"]])
        return torch.cat([ids, extra], 1)


def test_passkey_scoring(tokenizer):
    right = passkey_accuracy(Oracle(tokenizer, False), tokenizer, [500, 700], trials=3)
    wrong = passkey_accuracy(Oracle(tokenizer, True), tokenizer, [500], trials=3)
    assert [r["accuracy"] for r in right] == [1.0, 1.0] and [r["length"] for r in right] == [500, 700]
    assert wrong[0]["accuracy"] == 0.0 and wrong[0]["passed"] == [False] * 3
    # the outcomes are kept trial by trial, in order (an oracle right on every other call)
    calls = iter(range(100))
    oracles = [Oracle(tokenizer, False), Oracle(tokenizer, True)]
    def generate(ids, context):
        assert tokenizer.decode(ids[context:]) == PASSKEY_QUESTION  # the question alone follows the context
        return oracles[next(calls) % 2].generate(torch.tensor([ids]))[0, len(ids) :]

    mixed = passkey_accuracy(oracles[0], tokenizer, [500], trials=5, generate=generate)
    assert mixed[0]["passed"] == [True, False, True, False, True] and mixed[0]["accuracy"] == 3 / 5


def test_eval_cli_json_on_source_and_identity_agree(tmp_path):
    src, _ = save_source(tmp_path, "mistral")
    out = tmp_path / "clla"
    runner = CliRunner()
    assert runner.invoke(app, ["convert", str(src), str(out), "--identity"]).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = ["--text", str(text), "--window", "64", "--max-tokens", "640", "--json"]
    r_src = runner.invoke(app, ["eval", str(src), *args])
    r_out = runner.invoke(app, ["eval", str(out), *args, "--reference", str(src), "--passkey", "128", "--passkey-trials", "2"])
    assert r_src.exit_code == 0 and r_out.exit_code == 0, r_out.output
    a = json.loads(r_src.stdout)["text"]
    b = json.loads(r_out.stdout)
    assert a["predictions"] == 10 * 63
    assert math.isclose(a["perplexity"], b["text"]["perplexity"], rel_tol=1e-5)
    assert b["text"]["top1_agreement"] == 1.0 and abs(b["text"]["kl"]) < 1e-6
    assert b["passkey"][0]["trials"] == 2 and 0.0 <= b["passkey"][0]["accuracy"] <= 1.0
