"""Calibration data: conversations sampled in the source's own chat template, mixed into the sampled text."""

import torch

import json

import pytest

from kvconvert.convert.calibrate import chat_frame, chat_rows, read_data, sample_chats
from kvconvert.errors import KvconvertError
from kvconvert.convert.pipeline import ConvertOptions, calibration_tokens
from kvconvert.convert.source import Source

from conftest import byte_tokenizer, tiny_source


def contains(row: list[int], part: list[int]) -> bool:
    return any(row[i : i + len(part)] == part for i in range(len(row) - len(part) + 1))


def test_sampled_chats_are_conversations_in_the_template():
    tok, model = byte_tokenizer(), tiny_source("llama")
    head, tail = chat_frame(tok)
    assert tok.decode(head + tail).count("<|im_start|>") == 2  # the user's turn opens, the assistant's begins
    rows = sample_chats(model, tok, 600, 100, seed=3, batch=4, user_tokens=8, answer_tokens=12)
    assert rows.shape == (6, 100)
    stream = rows.flatten().tolist()
    assert stream[: len(head)] == head and contains(stream, tail)
    assert torch.equal(rows, sample_chats(model, tok, 600, 100, seed=3, batch=4, user_tokens=8, answer_tokens=12))
    assert not torch.equal(rows, sample_chats(model, tok, 600, 100, seed=4, batch=4, user_tokens=8, answer_tokens=12))


def test_an_instruct_source_calibrates_and_judges_on_chats_too():
    tok, model = byte_tokenizer(), tiny_source("llama")
    source = Source(ref=None, model=model, tokenizer=tok, model_type="llama")
    opts = ConvertOptions(calib_tokens=1024, heldout_tokens=512, seq_len=256)
    calib, held, origin = calibration_tokens(source, opts)
    assert calib.shape[1] == held.shape[1] == 256 and held.shape[0] == 2 and "chats" in origin
    head, _ = chat_frame(tok)
    assert not contains(held[0].tolist(), head) and contains(held[1].tolist(), head)  # free text, then a chat
    assert sum(contains(r, head) for r in calib.tolist()) >= 1
    tok.chat_template = None  # a base model: sampled text only
    calib, held, origin = calibration_tokens(source, opts)
    assert "chats" not in origin and not any(contains(r, head) for r in torch.cat([calib, held]).tolist())


def test_the_recall_probe_repeats_its_start_and_scores_the_repeat():
    from kvconvert.convert.plan import RecallProbe

    head, filler = torch.arange(10, 26), torch.arange(100, 200)
    probe = RecallProbe.build(head, filler, 80)
    t = probe.tokens[0].tolist()
    assert len(t) == 80 and t[:16] == t[-16:] == head.tolist() and t[16:64] == list(range(100, 148))
    assert probe.start == 64
    assert RecallProbe.build(head, filler[:20], 80) is None  # less filler than two rows: no probe
    a, b = tiny_source("llama", seed=0), tiny_source("llama", seed=1)
    ref = probe.logp(a)
    assert ref.shape == (1, 15, a.config.vocab_size)
    assert abs(probe.kl(a, ref)) < 1e-6 and probe.kl(b, ref) > 0.01


def test_data_conversations_are_answered_by_the_source_in_its_template(tmp_path):
    tok, model = byte_tokenizer(), tiny_source("llama")
    f = tmp_path / "chats.jsonl"
    lines = [{"prompt": f"Question number {i}: what is {i} plus {i}?"} for i in range(6)]
    lines += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."},
                            {"role": "assistant", "content": "The Thames."}]}, {"text": "Plain text beside them. " * 40}]
    f.write_text("\n".join(json.dumps(x) for x in lines))
    data = read_data([f])
    assert len(data.chats) == 7 and data.text.startswith("Plain text")
    assert data.chats[0] == [{"role": "user", "content": "Question number 0: what is 0 plus 0?"}]
    rows = chat_rows(model, tok, data.chats, 800, 200, seed=1, batch=4, answer_tokens=10)
    assert rows.shape == (4, 200)
    text = tok.decode(rows.flatten())
    # each conversation in the template up to its last user message, then the source's own answer (not the given one)
    assert "<|im_start|>user\nQuestion number" in text and "The Thames." not in text
    assert torch.equal(rows, chat_rows(model, tok, data.chats, 800, 200, seed=1, batch=4, answer_tokens=10))
    # calibration: conversations beside the text, in both the calibration and the held-out rows
    source = Source(ref=None, model=model, tokenizer=tok, model_type="llama")
    opts = ConvertOptions(calib_tokens=768, heldout_tokens=512, seq_len=256, data=[f])
    (tmp_path / "more.txt").write_text("Another plain line of text for calibration. " * 60)
    opts.data.append(tmp_path / "more.txt")
    calib, held, origin = calibration_tokens(source, opts)
    assert calib.shape == (3, 256) and held.shape == (2, 256) and "7 conversations" in origin
    head, _ = chat_frame(tok)
    assert not contains(held[0].tolist(), head) and contains(held[1].tolist(), tok("Question number").input_ids)
    tok.chat_template = None
    with pytest.raises(KvconvertError, match="chat template"):
        calibration_tokens(source, opts)
