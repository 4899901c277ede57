"""Calibration data: conversations sampled in the source's own chat template, mixed into the sampled text."""

import torch

from kvconvert.convert.calibrate import chat_frame, sample_chats
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
