"""Calibration data: conversations sampled in the source's own chat template, mixed into the sampled text."""

import torch

import json

import pytest

from kvconvert.convert.calibrate import chat_frame, chat_rows, read_data, sample_chats, sample_tokens
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


def test_sampling_leaves_the_global_generator_as_it_was():
    """generate() draws from torch's global generator: sampling seeds it for itself and gives the caller's back, so
    what a caller draws next does not depend on whether it sampled or read its samples from a file."""
    tok, model = byte_tokenizer(), tiny_source("llama")
    torch.manual_seed(11)
    want = torch.rand(4)
    torch.manual_seed(11)
    rows = sample_chats(model, tok, 200, 100, seed=3, batch=2, user_tokens=4, answer_tokens=6)
    text = sample_tokens(model, tok, 64, 32, seed=3)
    assert torch.equal(torch.rand(4), want)
    torch.manual_seed(12)  # and the samples are the seed's, whatever the caller's state
    assert torch.equal(rows, sample_chats(model, tok, 200, 100, seed=3, batch=2, user_tokens=4, answer_tokens=6))
    assert torch.equal(text, sample_tokens(model, tok, 64, 32, seed=3))


def test_an_instruct_source_calibrates_and_judges_on_chats_too():
    tok, model = byte_tokenizer(), tiny_source("llama")
    source = Source(ref=None, model=model, tokenizer=tok, model_type="llama")
    opts = ConvertOptions(calib_tokens=1024, heldout_tokens=512, seq_len=256)
    calib, held, origin, *_ = calibration_tokens(source, opts)
    assert calib.shape[1] == held.shape[1] == 256 and held.shape[0] == 2 and "chats" in origin
    head, _ = chat_frame(tok)
    assert not contains(held[0].tolist(), head) and contains(held[1].tolist(), head)  # free text, then a chat
    assert sum(contains(r, head) for r in calib.tolist()) >= 1
    tok.chat_template = None  # a base model: sampled text only
    calib, held, origin, *_ = calibration_tokens(source, opts)
    assert "chats" not in origin and not any(contains(r, head) for r in torch.cat([calib, held]).tolist())


def test_the_recall_probe_repeats_its_start_and_scores_the_repeat():
    from kvconvert.convert.plan import RecallProbe

    head, filler = torch.arange(10, 26), torch.arange(100, 200)
    probe = RecallProbe.build(head, filler, 80)
    t = probe.tokens[0].tolist()
    assert len(t) == 80 and t[:16] == t[-16:] == head.tolist() and t[16:64] == list(range(100, 148))
    assert probe.mask[0].nonzero().flatten().tolist() == list(range(65, 80))  # the second A after its first token
    assert RecallProbe.build(head, filler[:20], 80) is None  # less filler than two rows: no probe
    a, b = tiny_source("llama", seed=0), tiny_source("llama", seed=1)
    ref = probe.logp(a)
    assert len(ref) == 1 and ref[0].shape == (15, a.config.vocab_size)
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
    calib, held, origin, *_ = calibration_tokens(source, opts)
    assert calib.shape == (3, 256) and held.shape == (2, 256) and "7 conversations" in origin
    head, _ = chat_frame(tok)
    assert not contains(held[0].tolist(), head) and contains(held[1].tolist(), tok("Question number").input_ids)
    tok.chat_template = None
    with pytest.raises(KvconvertError, match="chat template"):
        calibration_tokens(source, opts)


def test_long_calibration_rows_pack_the_running_text_with_far_repeats():
    from kvconvert.convert.calibrate import long_calibration_rows

    stream = torch.arange(1000, 1000 + 40 * 16)  # 40 pieces of 16 tokens
    rows, long = long_calibration_rows(stream, 4, 96, 16, seed=5, lead=[7])
    assert long.shape == rows.shape and not long[:, 0].any()
    assert rows.shape == (4, 96) and (rows[:, 0] == 7).all()
    assert ((rows[:, 1:] >= 1000) & (rows[:, 1:] < 1640)).all()  # the rest is the stream's own tokens
    # a recall row: its last piece repeats its first (after the lead, which takes the first token's place)
    assert any(r[1:16].tolist() == r[-15:].tolist() for r in rows)
    assert torch.equal(rows, long_calibration_rows(stream, 4, 96, 16, seed=5, lead=[7])[0])
    assert not torch.equal(rows, long_calibration_rows(stream, 4, 96, 16, seed=6, lead=[7])[0])


def test_sampled_rows_run_on_without_their_start_tokens():
    from kvconvert.convert.calibrate import SAMPLE_PREFIX

    tok, model = byte_tokenizer(), tiny_source("llama")
    source = Source(ref=None, model=model, tokenizer=tok, model_type="llama")
    opts = ConvertOptions(calib_tokens=1024, heldout_tokens=512, seq_len=256)
    calib, held, _, stream, lead = calibration_tokens(source, opts)  # an instruct source: text and chats
    free = calib[:3]  # 6 rows: 4 free text (1 held out), 2 chats (1 held out); _mix puts the free text first
    assert lead == [model.config.bos_token_id] and (free[:, 0] == lead[0]).all()
    assert torch.equal(stream[: free[:, SAMPLE_PREFIX:].numel()], free[:, SAMPLE_PREFIX:].flatten())
    assert torch.equal(stream[free[:, SAMPLE_PREFIX:].numel():], calib[3:].flatten())  # then the chats, whole
    tok.chat_template = None
    calib, held, _, stream, lead = calibration_tokens(source, opts)
    assert torch.equal(stream, calib[:, SAMPLE_PREFIX:].flatten())


def test_long_rows_join_the_statistics_and_are_recorded(tmp_path):
    from kvconvert.convert.calibrate import collect_inputs
    from kvconvert.convert.pipeline import long_calibration

    tok, model = byte_tokenizer(), tiny_source("llama")
    source = Source(ref=None, model=model, tokenizer=tok, model_type="llama")
    opts = ConvertOptions(calib_tokens=1024, heldout_tokens=512, seq_len=128)
    calib, _, _, stream, lead = calibration_tokens(source, opts)
    long = long_calibration(source, stream, lead, opts)
    assert long.shape == (2, model.config.max_position_embeddings)  # capped at the model's positions
    cal = collect_inputs(model, calib, long=long)
    short = collect_inputs(model, calib)
    assert cal.n == calib.numel() + long.numel() and torch.equal(cal.tokens, calib)
    assert torch.equal(cal.inputs[1][: short.n], short.inputs[1])  # the short rows' statistics, then the long ones
    assert long_calibration(source, stream, lead, ConvertOptions(seq_len=128, long_rows=0)) is None
    assert long_calibration(source, stream, lead, ConvertOptions(seq_len=512)) is None  # no room past the short rows


def test_the_recall_probe_averages_its_rows_scored_tokens():
    from kvconvert.convert.pipeline import recall_probe
    from kvconvert.convert.plan import RecallProbe

    tok, a, b = byte_tokenizer(), tiny_source("llama", seed=0), tiny_source("llama", seed=1)
    rows = torch.randint(0, 200, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, 30:] = True
    mask[2, [5, 17]] = True  # row 1 scores nothing: left out
    probe = RecallProbe.from_rows(rows, mask)
    assert probe.tokens.shape == (2, 40) and torch.equal(probe.tokens[1], rows[2])
    by_hand = []
    for r, m in ((rows[0], mask[0]), (rows[2], mask[2])):
        pa = torch.log_softmax(a(r[None]).logits[0, :-1][m[1:]].float(), -1)
        pb = torch.log_softmax(b(r[None]).logits[0, :-1][m[1:]].float(), -1)
        by_hand.append((pa.exp() * (pa - pb)).sum(-1).mean().item())
    assert probe.kl(b, probe.logp(a)) == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    from kvconvert.convert.identity import build_identity

    assert abs(probe.kl(build_identity(a, "llama", "tiny"), probe.logp(a))) < 1e-5  # CLLA keeps the same positions
    # the planner's probe: rows of the calibration text, half copies of their start, half long-context trials
    source = Source(ref=None, model=a, tokenizer=tok, model_type="llama")
    a.config.max_position_embeddings = 1024
    opts = ConvertOptions(calib_tokens=2048, heldout_tokens=512, seq_len=128)
    _, _, _, stream, lead = calibration_tokens(source, opts)
    probe = recall_probe(source, stream, lead, opts)
    assert probe.tokens.shape == (4, 1024) and (probe.tokens[:, 0] == lead[0]).all()
    copies = [r for r, m in zip(probe.tokens, probe.mask) if torch.equal(r[1:128], r[-127:]) and m[-1]]  # A: one 128-token piece
    assert len(copies) == 2 and probe.mask.any(1).all()
    one = recall_probe(source, stream, lead, ConvertOptions(seq_len=128, probe_rows=1))
    assert one.tokens.shape == (1, 1024) and torch.equal(one.tokens[0, 1:128], one.tokens[0, -127:])  # a recall row
    assert recall_probe(source, stream, lead, ConvertOptions(seq_len=128, probe_rows=0)) is None
