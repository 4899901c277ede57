"""Distillation: the loss, the schedule, the data order, training that works, exact resume, signals, DDP, errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import byte_tokenizer, save_source
from kvconvert.cli import app
from kvconvert.convert.pipeline import ConvertOptions, convert
from kvconvert.distill.data import TrainingData, long_rows
from kvconvert.distill.run import distill_folder
from kvconvert.distill import dist
from kvconvert.distill.loss import (chunked_kl, distill_loss, logit_chunk_tokens, model_hidden, validate,
                                   validation_sums)
from kvconvert.distill.train import DistillOptions, Interrupted, lr_factor, trainable_names
from kvconvert.loading import load_clla

runner = CliRunner()


def text_file(path: Path, n_bytes: int = 60_000, seed: int = 0) -> Path:
    """Words drawn from a small vocabulary with a Zipf-like law: text a tiny byte-level model can learn from."""
    g = torch.Generator().manual_seed(seed)
    words = ["the", "latent", "cache", "of", "a", "model", "stores", "keys", "and", "values", "in", "few", "bits",
             "attention", "reads", "it", "layer", "group", "shares", "one"]
    probs = torch.tensor([1 / (i + 1) for i in range(len(words))])
    out, size = [], 0
    while size < n_bytes:
        idx = torch.multinomial(probs, 12, replacement=True, generator=g)
        line = " ".join(words[i] for i in idx) + ".\n"
        out.append(line)
        size += len(line)
    path.write_text("".join(out))
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny Llama (peaked logits: initializer_range 0.2) and its zero-shot CLLA conversion at a lossy plan."""
    tmp = tmp_path_factory.mktemp("distill")
    src, _ = save_source(tmp, "llama", initializer_range=0.2)
    out = tmp / "clla"
    convert(str(src), out, ConvertOptions(kv_ratio=0.1, calib_tokens=1024))
    return src, out, text_file(tmp / "train.txt")


def small_opts(data: Path, **kw) -> DistillOptions:
    base = dict(tokens=16 * 8 * 32, seq_len=32, batch_size=8, lr=3e-3, eval_every=8, save_every=4, val_tokens=256,
                data=[data], device="cpu")
    return DistillOptions(**(base | kw))


# ------------------------------------------------------------------------------------------------ pure parts
def test_distill_loss_is_kl_and_hidden_term():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    loss, kl = distill_loss(s, t, temperature=2.0)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1).mean() * 4
    assert torch.allclose(loss, ref, atol=1e-6) and torch.equal(loss.detach(), kl)
    assert distill_loss(t, t, 1.0)[0].abs().item() < 1e-6
    # Hidden term: student layer outputs twice the teacher's give ‖h‖²/‖h‖² = 1 per layer (first and last excluded).
    th = tuple(torch.randn(2, 5, 7) for _ in range(4))
    sh = (th[0], 2 * th[1], 2 * th[2], th[3] + 5)
    loss_h, kl_h = distill_loss(s, t, 1.0, sh, th, hidden_weight=0.5)
    assert abs((loss_h - kl_h).item() - 0.5) < 1e-5


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    steps = 100
    f = [lr_factor(s, steps, 0.1, 0.1) for s in range(steps)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(steps, steps, 0.1, 0.1) == pytest.approx(0.1)


def test_data_order_is_a_permutation_per_epoch_and_split_like_a_straight_run():
    train = torch.arange(10)[:, None].repeat(1, 3)
    data = TrainingData(train, train[:1], "test", seed=3)
    epoch0 = [data.sequence_index(p) for p in range(10)]
    epoch1 = [data.sequence_index(p) for p in range(10, 20)]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    # One process with 2 micro-batches per step reads what two processes with one each read (index step*A*W+m*W+r).
    one = [data.micro_batch(s * 2 + m, 2) for s in range(3) for m in range(2)]
    two = [data.micro_batch(s * 2 + r, 2) for s in range(3) for r in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    again = TrainingData(train, train[:1], "test", seed=3)
    assert torch.equal(again.micro_batch(4, 3), data.micro_batch(4, 3))


def _text_pool(tok, rows: int, width: int) -> torch.Tensor:
    """(rows, width) byte-token rows of sentence-like text, as a pool of teacher samples would be."""
    words = ["the", "river", "passed", "a", "quiet", "road", "and", "an", "old", "mill", "stood", "by", "it"]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(rows):
        text = ""
        while len(text) < width:
            idx = torch.randint(0, len(words), (8,), generator=g).tolist()
            text += " ".join(words[i] for i in idx).capitalize() + ". "
        out.append(tok(text, add_special_tokens=False).input_ids[:width])
    return torch.tensor(out)


def test_long_rows_repeat_far_back_pose_tasks_and_are_seeded():
    tok = byte_tokenizer()
    pool = _text_pool(tok, 24, 64)
    rows, long = long_rows(pool, 16, 1024, seed=5, tokenizer=tok)
    again, long_again = long_rows(pool, 16, 1024, seed=5, tokenizer=tok)
    assert torch.equal(rows, again) and torch.equal(long, long_again)
    assert not torch.equal(rows, long_rows(pool, 16, 1024, seed=6, tokenizer=tok)[0])
    kinds = {"recall": 0, "task": 0, "packed": 0}
    pool_rows = {tuple(r) for r in pool.tolist()}
    for row, far in zip(rows, long):
        if not far.any():  # packed: whole pool rows end to end
            assert all(tuple(row[i : i + 64].tolist()) in pool_rows for i in range(0, 1024, 64))
            kinds["packed"] += 1
        elif far[-1]:  # recall: the first block again at the very end, and only its predictable tokens marked
            assert torch.equal(row[:64], row[-64:]) and int(far.sum()) == 63 and far[-63:].all()
            kinds["recall"] += 1
        else:  # task: the marked tokens are the answers, found earlier in the haystack
            text = tok.decode(row)
            answer = tok.decode(row[far])
            codes = [c for c in answer.replace(",", " ").replace(".", " ").split()]
            assert codes and all(text.count(c) >= 2 for c in codes)
            assert far.nonzero().min() > 512  # after the haystack
            kinds["task"] += 1
    assert kinds == {"recall": 4, "task": 2, "packed": 10}


def test_long_text_sequences_come_with_recall_and_task_rows_made_from_the_text(tmp_path):
    """--data at a --seq-len past SAMPLE_LEN: every text sequence trains, recall and task rows made from the training
    text are added in the data-free shares, and validation keeps its size with long rows from the held-out text."""
    from kvconvert.distill.data import RECALL_SHARE, SAMPLE_LEN, TASK_SHARE, from_files, pack_text

    data = text_file(tmp_path / "train.txt")
    tok = byte_tokenizer()
    seq = 2 * SAMPLE_LEN
    d = from_files(tok, [data], seq, 4, 2, seed=3)
    text = pack_text(tok, data.read_text(), seq)
    n_text = text.shape[0] - 4
    share = RECALL_SHARE + TASK_SHARE
    assert torch.equal(d.train[:n_text], text[:n_text])
    extra = d.train[n_text:]
    assert len(extra) == round(share / (1 - share) * n_text) > 0
    recall = [r for r in extra if torch.equal(r[: seq // 4], r[-(seq // 4) :])]  # long_rows: a quarter
    assert len(recall) == round(RECALL_SHARE / share * len(extra))
    train_text = text[:n_text].flatten().tolist()
    assert all(str(r[:64].tolist())[1:-1] in str(train_text) for r in recall[:3])  # made from the training text
    assert d.val.shape == (4, seq) and torch.equal(d.val[:2], text[-4:-2])
    assert not d.val_long[:2].any() and d.val_long[2:].any(1).all()
    val_recall = d.val[2:][torch.tensor([torch.equal(r[: seq // 4], r[-(seq // 4) :]) for r in d.val[2:]])]
    held_out = str(text[-4:].flatten().tolist())
    assert len(val_recall) == 1 and str(val_recall[0, :64].tolist())[1:-1] in held_out  # from held-out text only
    again = from_files(tok, [data], seq, 4, 2, seed=3)
    assert torch.equal(again.train, d.train) and torch.equal(again.val_long, d.val_long)
    few = from_files(tok, [data], seq, 4, 2, seed=3, train_seqs=5)  # a run that reads 5 sequences: as many made
    n_few = round((1 - share) * 5)  # of the text, and long rows in their share
    assert few.train.shape[0] == 5 and n_few + round(share / (1 - share) * n_few) == 5
    rows = {tuple(r) for r in text[:n_text].tolist()}
    assert all(tuple(r) in rows for r in few.train[:n_few].tolist()) and not torch.equal(few.train[:n_few], text[:n_few])
    assert not {tuple(r) for r in few.train[n_few:].tolist()} & rows
    short = from_files(tok, [data], SAMPLE_LEN, 4, 2, seed=3)  # short sequences: the text alone, as before
    assert short.val_long is None and torch.equal(short.train, pack_text(tok, data.read_text(), SAMPLE_LEN)[:-4])


def test_text_data_for_an_instruct_teacher_gets_its_conversations(student, tmp_path, monkeypatch):
    """--data text alone, an instruct teacher: conversations the teacher writes in its template join the text as
    CHAT_SHARE of the sequences the run reads and of validation, at short and at long sequences (beside the long
    rows there); without a chat template the text is left as it was."""
    src, _, data = student
    from kvconvert.convert.calibrate import CHAT_SHARE
    from kvconvert.distill.data import SAMPLE_LEN, from_files, pack_text
    from kvconvert.loading import load_any

    teacher = load_any(str(src))
    tok = teacher.tokenizer
    head = tok("<|im_start|>user\n", add_special_tokens=False).input_ids
    chat = lambda r: r[: len(head)] == head  # noqa: E731  (conversations packed from the start of a sequence)
    rows = lambda t: {tuple(r) for r in t.tolist()}  # noqa: E731
    text = pack_text(tok, data.read_text(), 64)
    d = from_files(tok, [data], 64, 4, 4, 0, teacher.model, train_seqs=9, cache_dir=tmp_path / "samples")
    n_chat = round(CHAT_SHARE * 9)  # of the 9 sequences the run reads: no conversation sampled that it would not reach
    assert d.train.shape[0] == 9 and rows(d.train[: 9 - n_chat]) <= rows(text[:-4])  # the text rows it reads
    talk = d.train[9 - n_chat :]
    assert len(rows(talk)) == n_chat
    assert chat(talk[0].tolist()) and not rows(talk) & rows(text)
    assert torch.equal(d.val[:3], text[-3:]) and chat(d.val[3].tolist()) and not rows(d.val[3:]) & rows(talk)
    assert "chat template" in d.origin and len(list((tmp_path / "samples").glob("chats-*.pt"))) == 2
    capped = from_files(tok, [data], 64, 4, 4, 0, teacher.model, chat_seqs=3, train_seqs=9)  # 1 sampled, cycled
    assert torch.equal(capped.train[9 - n_chat :], talk[:1].expand(n_chat, -1))
    monkeypatch.setattr("kvconvert.distill.data.sample_chats", lambda *a, **k: pytest.fail("sampled again"))
    again = from_files(tok, [data], 64, 4, 4, 0, teacher.model, train_seqs=9, cache_dir=tmp_path / "samples")
    assert torch.equal(again.train, d.train) and torch.equal(again.val, d.val)  # from the saved conversations
    monkeypatch.undo()
    from kvconvert.distill import dist  # under torchrun: the first process samples, every process reads its file

    waits = []
    monkeypatch.setattr(dist, "barrier", lambda world: waits.append(world.rank))
    first = from_files(tok, [data], 64, 4, 4, 0, teacher.model, train_seqs=9, cache_dir=tmp_path / "ranks",
                       world=dist.World(rank=0, size=2))
    monkeypatch.setattr("kvconvert.distill.data.sample_chats", lambda *a, **k: pytest.fail("sampled off the first"))
    second = from_files(tok, [data], 64, 4, 4, 0, teacher.model, train_seqs=9, cache_dir=tmp_path / "ranks",
                        world=dist.World(rank=1, size=2))
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert torch.equal(first.train, d.train) and waits == [0, 0, 1, 1]  # once per file, on every process
    monkeypatch.undo()
    seq = 2 * SAMPLE_LEN
    long = from_files(tok, [data], seq, 4, 2, 0, teacher.model, train_seqs=3)
    assert long.train.shape[0] == 3  # what the run reads: a text row, a conversation and a long row
    talk, whole = long.train[1:2], rows(pack_text(tok, data.read_text(), seq))
    assert chat(talk[0].tolist()) and not rows(talk) & whole
    assert rows(long.train[:1]) <= whole and not chat(long.train[2].tolist()) and not rows(long.train[2:]) & whole
    held = pack_text(tok, data.read_text(), seq)[-4:]
    assert torch.equal(long.val[0], held[0]) and chat(long.val[1].tolist())
    assert not long.val_long[:2].any() and long.val_long[2:].any(1).all()
    plain = byte_tokenizer()
    plain.chat_template = None  # no chat template: the text alone, as before
    assert torch.equal(from_files(plain, [data], 64, 4, 4, 0, teacher.model, train_seqs=9).train,
                       pack_text(plain, data.read_text(), 64)[:-4])


def test_data_free_long_sequences_are_packed_from_short_samples(student, tmp_path):
    src, _, _ = student
    from kvconvert.distill.data import sampled
    from kvconvert.loading import load_any

    teacher = load_any(str(src))
    data = sampled(teacher.model, teacher.tokenizer, 8, 4, 256, 0, tmp_path / "samples", dist.World(), chunk_seqs=64,
                   sample_len=32)
    assert data.train.shape == (8, 256) and data.val.shape == (4, 256) and data.val_long.shape == (4, 256)
    pool = torch.cat([torch.load(p, weights_only=True) for p in sorted((tmp_path / "samples").glob("train-*.pt"))])
    assert pool.shape[1] == 32  # drawn short...
    samples = {tuple(r) for r in pool.tolist()}
    packed = [r for r in data.train if all(tuple(r[i : i + 32].tolist()) in samples for i in range(0, 256, 32))]
    assert 0 < len(packed) < 8  # ...and packed, beside rows with a far dependency
    assert data.val_long.any(1).sum() == 2  # one recall and one task row among four
    head = teacher.tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids
    chats = sum(any(r[i : i + len(head)] == head for i in range(32 - len(head))) for r in pool.tolist())
    assert chats >= 2  # an instruct teacher: conversations among the samples (a quarter of each chunk)
    again = sampled(teacher.model, teacher.tokenizer, 8, 4, 256, 0, tmp_path / "samples", dist.World(), chunk_seqs=64,
                    sample_len=32)  # from the saved chunks
    assert torch.equal(again.train, data.train) and torch.equal(again.val_long, data.val_long)


@pytest.mark.parametrize("sample_dtype, native, dtype", [("auto", True, torch.bfloat16), ("auto", False, torch.float32),
                                                          ("float32", True, torch.float32)])
def test_the_teacher_samples_in_its_sample_dtype(student, tmp_path, monkeypatch, sample_dtype, native, dtype):
    """make_data samples the teacher in opts.sample_dtype: auto is bfloat16 autocast where the hardware has it
    natively (convert/precision.py)."""
    src, _, _ = student
    from kvconvert.convert import precision
    from kvconvert.distill.run import make_data
    from kvconvert.loading import load_any

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    teacher = load_any(str(src))
    seen = []
    teacher.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opts = DistillOptions(tokens=4 * 64, seq_len=64, batch_size=2, val_tokens=128, sample_tokens=4 * 64,
                          sample_dtype=sample_dtype)
    data = make_data(teacher.model, teacher.tokenizer, opts, tmp_path, dist.World(), lambda *a: None)
    assert seen and set(seen) == {dtype}
    assert data.train.shape[1] == 64 and len(data.train) >= 4 and len(data.val) == 2


def test_data_conversations_are_answered_by_the_teacher(student, tmp_path):
    src, _, _ = student
    from kvconvert.distill.data import from_files
    from kvconvert.loading import load_any

    teacher = load_any(str(src))
    f = tmp_path / "chats.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"Tell me about layer {i}."}) for i in range(5)))
    alone = from_files(teacher.tokenizer, [f], 64, 2, 4, 0, teacher.model, chat_seqs=6)
    assert alone.train.shape == (6, 64) and alone.val.shape == (2, 64) and "5 conversations" in alone.origin
    decoded = teacher.tokenizer.decode(torch.cat([alone.train, alone.val]).flatten())
    assert decoded.count("<|im_start|>user\nTell me about layer") >= 3  # about 140 tokens a conversation
    small = text_file(tmp_path / "small.txt", n_bytes=2_000)
    mixed = from_files(teacher.tokenizer, [small, f], 64, 4, 4, 0, teacher.model)
    text_rows = len(small.read_text().encode()) // 64  # the byte tokenizer: a token a byte
    assert mixed.train.shape[0] + mixed.val.shape[0] == text_rows + round(text_rows / 3)  # a quarter are chats
    assert any("<|im_start|>" in teacher.tokenizer.decode(r) for r in mixed.val)
    cache = tmp_path / "samples"  # answered once: a resumed run (or another process) reads the saved answers
    first = from_files(teacher.tokenizer, [f], 64, 2, 4, 0, teacher.model, chat_seqs=6, cache_dir=cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("kvconvert.convert.calibrate.chat_rows", lambda *a, **k: pytest.fail("answered again"))
        again = from_files(teacher.tokenizer, [f], 64, 2, 4, 0, teacher.model, chat_seqs=6, cache_dir=cache)
    assert torch.equal(again.train, first.train) and torch.equal(again.val, first.val)
    f.write_text(json.dumps({"prompt": "Another question."}))  # other conversations: answered anew, beside
    other = from_files(teacher.tokenizer, [f], 64, 2, 4, 0, teacher.model, chat_seqs=6, cache_dir=cache)
    assert len(list(cache.glob("answers-*.pt"))) == 2 and "Another question" in teacher.tokenizer.decode(
        torch.cat([other.train, other.val]).flatten())


def test_long_range_validation_kl_counts_only_the_marked_tokens(student):
    src, out, _ = student
    from kvconvert.loading import load_any

    teacher, clla = load_any(str(src)).model.eval(), load_clla(out).model.eval()
    val = torch.randint(0, teacher.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    far = torch.zeros_like(val, dtype=torch.bool)
    far[:, 40:] = True
    none = contextlib.nullcontext
    same = validate(teacher, teacher, val, 2, "cpu", none, dist.World(), far)
    assert same["long_kl"] == 0 and same["kl"] == 0
    v = validate(clla, teacher, val, 2, "cpu", none, dist.World(), far)
    assert "long_kl" not in validate(clla, teacher, val, 2, "cpu", none, dist.World())
    # by hand: the mean over the marked targets (tokens 40..63, predicted from positions 39..62)
    s = F.log_softmax(clla(val).logits.float(), -1)[:, 39:63]
    t = F.log_softmax(teacher(val).logits.float(), -1)[:, 39:63]
    assert abs(v["long_kl"] - (t.exp() * (t - s)).sum(-1).mean().item()) < 1e-4


@pytest.mark.parametrize("processes", [2, 4])
def test_validation_counts_every_sequence_once_across_processes(student, processes):
    """3 held-out sequences among 2 or 4 processes: the processes' sums add up to one process's (the last sequence,
    the one with long-range tokens, was dropped before when the rows did not divide)."""
    src, out, _ = student
    from kvconvert.loading import load_any

    teacher, clla = load_any(str(src)).model.eval(), load_clla(out).model.eval()
    val = torch.randint(0, teacher.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    far = torch.zeros_like(val, dtype=torch.bool)
    far[2, 20:] = True
    args = (clla, teacher, val, 2, "cpu", contextlib.nullcontext)
    one = validation_sums(*args, dist.World(), far)
    shares = [validation_sums(*args, dist.World(rank, processes), far) for rank in range(processes)]
    total = [sum(x) for x in zip(*shares)]
    assert total[3] == one[3] == 3 * 31 and total[5] == one[5] == 12
    assert total[2] == one[2]
    for a, b in zip(total, one):
        assert a == pytest.approx(b, rel=1e-5)


def test_default_sequences_are_as_long_as_the_model_takes():
    from kvconvert.distill.train import resolve_lengths, uses_grad_checkpointing

    o = DistillOptions(tokens=1)
    assert (o.seq_len, o.batch_size) == (0, 0)  # resolved once the model and the device are known
    assert (resolve_lengths(o, 8192, "cuda:0").seq_len, resolve_lengths(o, 8192, "cuda:0").batch_size) == (4096, 4)
    short = resolve_lengths(o, 2048, "cpu")
    assert (short.seq_len, short.batch_size) == (2048, 2)
    given = resolve_lengths(DistillOptions(tokens=1, seq_len=100, batch_size=3), 8192, "cpu")
    assert (given.seq_len, given.batch_size) == (100, 3)
    cpu = torch.device("cpu")
    assert uses_grad_checkpointing(short, cpu) and not uses_grad_checkpointing(given, cpu)
    assert not uses_grad_checkpointing(replace(short, grad_checkpointing=False), cpu)
    # On GPU: recomputed only where the step would not fit with every activation kept (and always under FSDP).
    gpu = torch.device("cuda", 0)
    assert not uses_grad_checkpointing(given, gpu, fits=lambda: True)
    assert uses_grad_checkpointing(given, gpu, fits=lambda: False)
    assert uses_grad_checkpointing(replace(given, fsdp=True), gpu, fits=lambda: True)
    assert not uses_grad_checkpointing(replace(given, grad_checkpointing=False), gpu, fits=lambda: False)
    assert uses_grad_checkpointing(short, cpu, fits=lambda: True)  # CPU: the token rule, host memory kept small


@pytest.mark.parametrize("arch, windows", [("llama", [None] * 3), ("mistral", [7] * 3), ("gemma3_text", [7, None, 7])])
def test_model_flops_count_every_matrix_and_the_causal_attention_span(arch, windows):
    """distill_flops_per_token by hand from the config: q/k/v/o, the MLP's three matrices and the LM head (no
    embedding lookup), attention over half the sequence or the window, the student ×3 (forward and backward)."""
    from conftest import tiny_source
    from kvconvert.distill.flops import distill_flops_per_token, linear_weights

    src = tiny_source(arch)
    c = src.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h, H, kv, inter = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    per_layer = h * H * d + 2 * h * kv * d + H * d * h + 3 * h * inter
    assert linear_weights(src) == c.num_hidden_layers * per_layer + c.vocab_size * h
    T = 64
    attention = sum(2 * 2 * min(T, w or T) / 2 * H * d for w in windows)
    one = 2 * linear_weights(src) + attention
    assert distill_flops_per_token(src, src, T) == pytest.approx(4 * one)


def test_saved_activations_are_counted_without_the_weights():
    """saved_activation_bytes counts what autograd keeps for backward: exactly the input of a linear layer (not its
    weight); for a model, many hidden-sized tensors per layer, and far fewer when layers are recomputed."""
    from conftest import tiny_source
    from kvconvert.convert.identity import build_identity
    from kvconvert.distill.loss import model_hidden
    from kvconvert.distill.train import saved_activation_bytes

    lin, x = torch.nn.Linear(8, 4), torch.randn(5, 8)
    assert saved_activation_bytes(lambda: lin(x), lin) == 5 * 8 * 4
    model = build_identity(tiny_source("llama"), "llama", "tiny").train()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    kept = saved_activation_bytes(lambda: model_hidden(model, model, ids)[0], model)
    per_layer = kept / (model.config.num_hidden_layers * ids.numel() * model.config.hidden_size * 4)
    assert per_layer > 10, per_layer
    model.model.gradient_checkpointing = True
    recomputed = saved_activation_bytes(lambda: model_hidden(model, model, ids)[0], model)
    assert recomputed < kept / 3, (recomputed, kept)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_small_gpu_step_keeps_its_activations(student, tmp_path):
    """On a GPU with room, the tiny model's step keeps every activation (no recomputation) and still learns."""
    src, zs, data = student
    rec = distill_folder(zs, str(src), small_opts(data, tokens=8 * 8 * 32, device="cuda", eval_every=8),
                         out=tmp_path / "d")
    d = rec["distill"][-1]
    assert d["grad_checkpointing"] is False
    assert d["best"]["kl"] < d["validation"][0]["val_kl"]


def test_chunked_kl_equals_the_full_kl_and_its_gradients():
    """The KL made from hidden states a few tokens at a time (logits made again in backward) is the KL of the full
    logits, and so are its gradients, with respect to the student's hidden states and its LM head."""
    from conftest import tiny_source

    student, teacher = tiny_source("llama", seed=0), tiny_source("llama", seed=1)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    s_out = student(ids, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(ids, output_hidden_states=True)
    full = distill_loss(s_out.logits, t_out.logits, 1.5)[0]
    grads_full = torch.autograd.grad(full, [s_out.hidden_states[-1], student.lm_head.weight], retain_graph=True)
    for chunk in (1, 5, 18, 1000):
        part = chunked_kl(s_out.hidden_states[-1], t_out.hidden_states[-1], student, teacher, 1.5, chunk)
        assert torch.allclose(part, full, rtol=1e-5, atol=1e-7), chunk
        grads = torch.autograd.grad(part, [s_out.hidden_states[-1], student.lm_head.weight], retain_graph=True)
        for a, b in zip(grads, grads_full):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), chunk


def test_the_final_hidden_states_alone_are_the_last_of_all_hidden_states(arch):
    """model_hidden without `layers` (a hook on the final norm, one position's logits) gives exactly the last entry
    of output_hidden_states, for every supported family and for a CLLA model, and keeps nothing else."""
    from conftest import tiny_source
    from kvconvert.convert.identity import build_identity

    source = tiny_source(arch, seed=0).eval()
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    for model in (source, build_identity(source, arch, "tiny").eval()):
        with torch.no_grad():
            every = model(ids, use_cache=False, output_hidden_states=True).hidden_states
            final, layers = model_hidden(model, model, ids)
            final_all, layers_all = model_hidden(model, model, ids, layers=True)
        assert layers is None and len(layers_all) == len(every)
        assert torch.equal(final, every[-1]) and torch.equal(final_all, every[-1])
        assert not model.model.norm._forward_hooks  # the hook is removed
    clla = build_identity(source, arch, "tiny").train()  # training, layers recomputed: the same states, and gradients
    clla.model.gradient_checkpointing = True
    final, _ = model_hidden(clla, clla, ids)
    every = clla(ids, use_cache=False, output_hidden_states=True).hidden_states
    assert torch.equal(final, every[-1])
    g1 = torch.autograd.grad(final.square().sum(), clla.get_input_embeddings().weight)[0]
    g2 = torch.autograd.grad(every[-1].square().sum(), clla.get_input_embeddings().weight)[0]
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-6) and g1.abs().sum() > 0


def test_logit_chunks_are_sized_by_bytes_unless_given():
    assert logit_chunk_tokens(None, 49152, "cpu") == (64 << 20) // (4 * 49152) == 341
    assert logit_chunk_tokens(None, 151936, torch.device("cuda:0")) == (256 << 20) // (4 * 151936) == 441
    assert logit_chunk_tokens(None, 10**9, "cpu") == 1
    assert logit_chunk_tokens(7, 49152, "cpu") == 7
    assert logit_chunk_tokens(0, 49152, "cpu") is None  # 0: the whole batch at once


def test_a_chunked_training_run_is_the_unchunked_one(student, tmp_path):
    src, zs, data = student
    runs = {}
    for chunk in (0, 7):  # 7 tokens: chunks cross sequence boundaries
        distill_folder(zs, str(src), small_opts(data, tokens=4 * 8 * 32, eval_every=2, logit_chunk=chunk),
                       out=tmp_path / f"c{chunk}", keep_checkpoints=True)
        progress = json.loads((tmp_path / f"c{chunk}.distill" / "state" / "progress.json").read_text())
        runs[chunk] = (progress["history"], load_file(tmp_path / f"c{chunk}" / "model.safetensors"))
    (h0, w0), (h7, w7) = runs[0], runs[7]
    assert [sorted(r) for r in h0] == [sorted(r) for r in h7]
    for a, b in zip(h0, h7):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    for name in w0:
        assert torch.allclose(w0[name], w7[name], rtol=1e-4, atol=1e-5), name


# ------------------------------------------------------------------------------------------------ training
def test_distillation_cuts_the_kl_to_the_teacher(student, tmp_path, monkeypatch):
    src, zs, _ = student
    # Data-free (sampled from the teacher), the default: 200 steps. The tiny teacher's chats, sampled in 128-token
    # turns, would be most of the sampling time at 32-token rows: free text only here (chats: test_data_free_long_...).
    monkeypatch.setattr("kvconvert.distill.data.CHAT_SHARE", 0.0)
    opts = DistillOptions(tokens=200 * 8 * 32, seq_len=32, batch_size=8, lr=1e-2, eval_every=50, save_every=10**6,
                          val_tokens=512, sample_tokens=256 * 32, device="cpu")
    rec = distill_folder(zs, str(src), opts, out=tmp_path / "d")
    val = rec["distill"][-1]["validation"]
    assert val[0]["step"] == 0
    zero_shot, best = val[0]["val_kl"], rec["distill"][-1]["best"]["kl"]
    assert best < 0.6 * zero_shot, (zero_shot, best)
    # What was exported is the best checkpoint: re-measure it.
    model = load_clla(tmp_path / "d").model
    teacher = load_clla_teacher(src)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    assert model.config.kv_latent_dim == load_clla(zs).model.config.kv_latent_dim
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        kl_after = distill_loss(model(ids).logits, teacher(ids).logits, 1.0)[1].item()
        kl_before = distill_loss(load_clla(zs).model(ids).logits, teacher(ids).logits, 1.0)[1].item()
    assert kl_after < kl_before
    assert not (tmp_path / "d.distill").exists()  # checkpoints removed after export


def load_clla_teacher(src):
    from kvconvert.loading import load_any

    return load_any(str(src)).model


@pytest.mark.parametrize("which, frozen, trained", [("latent", ("q_proj", "mlp"), "kv_down"), ("attention", ("mlp", "embed"), "q_proj")])
def test_only_the_chosen_parameters_train(student, tmp_path, which, frozen, trained):
    src, zs, data = student
    distill_folder(zs, str(src), small_opts(data, tokens=4 * 8 * 32, train=which, eval_every=100), out=tmp_path / "d")
    before, after = dict(load_clla(zs).model.named_parameters()), dict(load_clla(tmp_path / "d").model.named_parameters())
    kinds = {n.split(".")[-2] for n in trainable_names(load_clla(zs).model, which)}
    allowed = {"kv_down", "rope_proj", "rope_up", "k_up", "v_up"} | ({"q_proj", "o_proj"} if which == "attention" else set())
    assert trained in kinds and kinds <= allowed
    for n, p in before.items():
        if any(f in n for f in frozen):
            assert torch.equal(p, after[n]), n
    assert any(not torch.equal(p, after[n]) for n, p in before.items() if trained in n)


def test_hidden_state_matching_adds_to_the_loss_and_trains(student, tmp_path):
    src, zs, data = student
    opts = small_opts(data, tokens=8 * 8 * 32, hidden_weight=1.0, eval_every=100)
    distill_folder(zs, str(src), opts, out=tmp_path / "d", keep_checkpoints=True)
    rows = [h for h in json.loads((tmp_path / "d.distill" / "state" / "progress.json").read_text())["history"] if "loss" in h]
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["loss"] > r["kl"] + 1e-4 for r in rows)  # the hidden-state term is there
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_resume_continues_exactly(student, tmp_path):
    """N steps straight == N/2 steps, a SIGTERM (checkpoint saved), then --resume for the rest."""
    src, zs, data = student
    opts = small_opts(data)
    distill_folder(zs, str(src), opts, out=tmp_path / "straight", keep_checkpoints=True)

    def stop_halfway(step, steps, metrics):
        if step == steps // 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag; the loop saves and stops

    with pytest.raises(Interrupted) as stopped:
        distill_folder(zs, str(src), opts, out=tmp_path / "split", step_progress=stop_halfway)
    assert stopped.value.signum == signal.SIGTERM
    assert not (tmp_path / "split").exists()
    ckpt = tmp_path / "split.distill"
    assert json.loads((ckpt / "state" / "progress.json").read_text())["step"] == 8
    distill_folder(zs, str(src), opts, out=tmp_path / "split", resume=True, keep_checkpoints=True)

    hist = lambda d: [h for h in json.loads((d / "state" / "progress.json").read_text())["history"] if "loss" in h]  # noqa: E731
    a, b = hist(tmp_path / "straight.distill"), hist(ckpt)
    assert [h["step"] for h in a] == [h["step"] for h in b] == list(range(1, 17))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7), (x, y)
    for name in ("trainable.safetensors", "best.safetensors"):
        wa = load_file(str(tmp_path / "straight.distill" / "state" / name))
        wb = load_file(str(ckpt / "state" / name))
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa), name
    # The best weights are kept on disk, not in memory; the export is the best, straight or resumed.
    best = load_file(str(tmp_path / "straight.distill" / "best.safetensors"))
    for run in ("straight", "split"):
        exported = dict(load_clla(tmp_path / run).model.named_parameters())
        assert all(torch.allclose(exported[k], t, rtol=1e-5, atol=1e-7) for k, t in best.items()), run


def test_the_best_weights_live_on_disk_and_a_resume_takes_the_saved_ones(tmp_path):
    """save_best replaces ckpt/BEST by a new file; a saved state keeps the best as it was when saved (linked, not
    overwritten by a later best); restore_best puts the state's best back, over a newer one a killed run left."""
    from kvconvert.distill.train import BEST, restore_best, save_best, save_state

    w = lambda v: {"a": torch.full((3,), float(v))}  # noqa: E731
    assert restore_best(tmp_path) is None  # nothing saved yet
    save_best(tmp_path, w(1))
    save_state(tmp_path, w(0), {"x": 1}, {"step": 4})
    save_best(tmp_path, w(2))  # a later best, after the save
    assert load_file(str(tmp_path / "state" / BEST))["a"][0] == 1
    assert load_file(str(tmp_path / BEST))["a"][0] == 2
    assert restore_best(tmp_path) == tmp_path / BEST
    assert load_file(str(tmp_path / BEST))["a"][0] == 1
    assert not list(tmp_path.glob(".*tmp"))


def test_a_checkpoint_of_other_data_making_is_not_resumed(student, tmp_path):
    """A state saved before the training sequences were made another way (no data_version) is refused."""
    from kvconvert.distill.train import check_resumable

    src, zs, data = student
    opts = small_opts(data)
    fp = opts.fingerprint(dist.World(), str(src))
    (tmp_path / "state").mkdir()
    old = {k: v for k, v in fp.items() if k != "data_version"}
    (tmp_path / "state" / "progress.json").write_text(json.dumps({"fingerprint": old}))
    with pytest.raises(Exception, match="data_version"):
        check_resumable(tmp_path, fp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# fsdp in the slow tier (14 s): the default tier runs two processes under ddp; both share the data split, the
# reduction of the validation sums and the world setup, fsdp adds the sharding of student and teacher
@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_gloo_processes_match_one_process(student, tmp_path, mode):
    """torchrun with 2 CPU processes (gloo; DDP, or FSDP2 with --fsdp), 1 micro-batch each == 1 process with 2
    micro-batches per step, data-free (each process samples its share of the pool, the same pool as one process)."""
    src, zs, _ = student
    common = ["--teacher", str(src), "--tokens", str(6 * 8 * 32), "--seq-len", "32", "--lr", "3e-3", "--eval-every", "3",
              "--val-tokens", "256", "--sample-tokens", str(16 * 32), "--device", "cpu", "--keep-checkpoints"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, "-m", "kvconvert", "distill", str(zs), "--out", str(tmp_path / "one"),
                          "--batch-size", "4", "--grad-accum", "2", *common], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "kvconvert", "distill", str(zs), "--out", str(tmp_path / "two"),
                          "--batch-size", "4", "--grad-accum", "1", *common, *(["--fsdp"] if mode == "fsdp" else [])],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    hist = lambda name: json.loads((tmp_path / f"{name}.distill" / "state" / "progress.json").read_text())["history"]  # noqa: E731
    a, b = hist("one"), hist("two")
    la, lb = [h["loss"] for h in a if "loss" in h], [h["loss"] for h in b if "loss" in h]
    assert len(la) == len(lb) == 6
    for x, y in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-4), (la, lb)
    assert la[-1] < la[0]
    wa = load_file(str(tmp_path / "one.distill" / "state" / "trainable.safetensors"))
    wb = load_file(str(tmp_path / "two.distill" / "state" / "trainable.safetensors"))
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= 1e-4 * wa[k].abs().max() + 1e-7, k
    assert (tmp_path / "two" / "model.safetensors").is_file()


def test_sigterm_mid_run_leaves_a_checkpoint_and_no_output_then_resumes(student, tmp_path):
    src, _, data = student
    out = tmp_path / "out"
    args = [sys.executable, "-m", "kvconvert", "convert", str(src), str(out), "--kv-ratio", "0.1", "--calib-tokens", "512",
            "--distill-tokens", str(400 * 4 * 32), "--seq-len", "32", "--batch-size", "4", "--save-every", "2",
            "--eval-every", "1000", "--val-tokens", "64", "--data", str(data), "--device", "cpu", "--judge-dtype", "float32"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    state = tmp_path / "out.distill" / "state" / "progress.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert state.exists(), proc.communicate()[1][-2000:] if proc.poll() is not None else "no checkpoint in 120 s"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 400
    # Resume with fewer total tokens than already trained is refused (other options); the same command resumes.
    r = runner.invoke(app, ["convert", str(src), str(out), "--kv-ratio", "0.1", "--distill-tokens", str(400 * 4 * 32),
                            "--seq-len", "32", "--batch-size", "8", "--data", str(data), "--resume", "--device", "cpu"])
    assert r.exit_code == 2 and "batch_size" in r.output
    # Finish quickly: the checkpoint says where it stopped; shrink nothing, just run the remaining steps.
    r = runner.invoke(app, args[3:] + ["--resume"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and not (tmp_path / "out.distill").exists()
    record = json.loads((out / "conversion.json").read_text())
    assert record["distill"][0]["steps"] == 400 and record["plan"] != "identity"
    assert record["judge_dtype"] == "float32" == record["distill"][0]["options"]["sample_dtype"]  # passed on


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_distill_input_is_one_line(student, tmp_path):
    src, zs, data = student

    def fails(args, needle):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        assert needle in r.output and "Traceback" not in r.output, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) <= 4  # one error line (rich may wrap it)

    base = ["--teacher", str(src), "--device", "cpu"]
    fails(["distill", str(src), *base, "--tokens", "4096"], "not a kvconvert CLLA model folder")
    fails(["distill", str(zs), *base, "--tokens", "100"], "less than one optimizer step")
    fails(["distill", str(zs), *base, "--tokens", "100000", "--train", "mlp"], "--train must be one of")
    fails(["distill", str(zs), *base, "--tokens", "100000", "--resume", "--out", str(tmp_path / "x")], "no checkpoint")
    fails(["distill", str(zs), *base, "--tokens", "100000", "--lr", "0"], "--lr")
    fails(["distill", str(zs), *base, "--tokens", "100000", "--fsdp"], "torchrun")
    fails(["distill", str(zs), *base, "--tokens", "1000000", "--data", str(data), "--val-tokens", "100000"], "need at least")
    (tmp_path / "x.distill").mkdir()
    fails(["distill", str(zs), *base, "--tokens", "100000", "--out", str(tmp_path / "x")], "--resume")
    other, _ = save_source(tmp_path, "qwen2", vocab_size=300)
    fails(["distill", str(zs), "--teacher", str(other), "--tokens", "20000", "--seq-len", "32", "--val-tokens", "64",
           "--device", "cpu", "--out", str(tmp_path / "y")], "vocabulary")
    assert not (tmp_path / "y").exists()
    fails(["convert", str(src), str(tmp_path / "z"), "--kv-ratio", "0.1", "--resume"], "--resume continues a distillation")
    fails(["convert", str(src), str(tmp_path / "z"), "--identity", "--distill-tokens", "1000"], "nothing to distill")
    assert not (tmp_path / "z").exists()


def test_qk_norm_models_train_their_query_map_and_key_norms():
    """A qk-norm model's conversion-made parts (the query map, the key norms' gains) are in the latent set, the norms
    themselves in the attention set; its key bias trains (key norms make it position-dependent)."""
    from test_runtime import tiny_clla

    model = tiny_clla(4, qk_norm=True)
    latent, attention = set(trainable_names(model, "latent")), set(trainable_names(model, "attention"))
    assert "model.layers.0.self_attn.q_map" in latent and "model.layers.0.self_attn.k_scale.gain" in latent
    assert "model.layers.0.self_attn.k_up.bias" in latent
    assert not any(".q_norm." in n or "k_scale.proj" in n or ".q_proj." in n for n in latent)
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_scale.proj.weight"} <= attention
    assert "model.layers.0.self_attn.k_up.bias" not in trainable_names(tiny_clla(4), "latent")
