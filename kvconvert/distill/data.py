"""Training sequences for distillation: packed from text files, or sampled from the teacher (data-free).

Both give `TrainingData`: `train` (N, seq_len) and a held-out `val` (M, seq_len) int64 token ids. The order of
training sequences is a pure function of (seed, position): epoch e visits `train` in a permutation seeded by
(seed, e), so a resumed run — or a run split over P processes — sees exactly the sequences a straight run would.

Data-free sequences longer than SAMPLE_LEN are packed from the teacher's samples (decoding a sequence costs a step
per token, so long samples are not drawn whole), and a share of them carries a long-range dependency
(`long_rows`): a recall row repeats its first block at its end, a task row is a long-context trial
(kvconvert.longcontext, on a haystack of the teacher's own text) followed by its answer. Packed samples alone never
ask the student to look further back than one sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..convert.calibrate import CHAT_SHARE, sample_chats, sample_tokens
from ..errors import KvconvertError
from . import dist

Progress = Callable[[int, int], None]

SAMPLE_LEN = 512  # data-free: the teacher's samples are drawn this long, then packed into sequences of --seq-len
RECALL_SHARE = 0.25  # of packed sequences: the first block repeated at the end
TASK_SHARE = 0.125  # of packed sequences: a long-context trial and its answer
LONG_SHARE = RECALL_SHARE + TASK_SHARE
TASK_SEED = 1_000_000_007  # task rows' trial seeds start here, far from the suite's (seed + i)


@dataclass
class TrainingData:
    train: torch.Tensor  # (N, seq_len) int64
    val: torch.Tensor  # (M, seq_len) int64, never trained on
    origin: str
    seed: int = 0
    val_long: torch.Tensor | None = None  # (M, seq_len) bool: tokens predictable only from far back (long_rows)
    _perms: dict = field(default_factory=dict, repr=False)

    def sequence_index(self, position: int) -> int:
        """Row of `train` at `position` in the training order (epochs of seeded permutations)."""
        epoch, pos = divmod(position, self.train.shape[0])
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.train.shape[0], generator=g)}  # keep one epoch's permutation
        return int(self._perms[epoch][pos])

    def micro_batch(self, index: int, size: int) -> torch.Tensor:
        """The index-th micro-batch of `size` sequences in the training order: (size, seq_len)."""
        rows = [self.sequence_index(p) for p in range(index * size, (index + 1) * size)]
        return self.train[rows]


def pack_text(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """(N, seq_len): the text's tokens cut into consecutive sequences (a trailing partial one dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def from_files(tokenizer, paths: list[Path], seq_len: int, val_seqs: int, batch_seqs: int, seed: int, teacher=None,
               chat_seqs: int = 0, progress: Callable[[str, int, int], None] | None = None,
               train_seqs: int | None = None, cache_dir: Path | None = None,
               world: dist.World | None = None) -> TrainingData:
    """Pack --data files; the last `val_seqs` sequences are held out (a contiguous slice: no overlap with training).
    Conversations in the files (.jsonl "messages" or "prompt" lines) are answered by the teacher in its chat
    template (calibrate.chat_rows): beside text they make CHAT_SHARE of the sequences, alone `chat_seqs` of them
    plus the validation ones (answered once, as the sampled conversations below are). Text alone, for an instruct
    teacher, gets conversations the teacher writes in its template (`teacher_chats`; distilled on text alone, a 5% conversion's chat agreement fell, docs/results.md),
    CHAT_SHARE of them and the text, and of validation (at most CHAT_SHARE × `chat_seqs` sampled, then cycled;
    saved under `cache_dir` by the first of `world`'s processes and read by all); at sequences past SAMPLE_LEN long
    rows are added beside both (`text_with_long_rows`). With `train_seqs`, the sequences a run reads, the training
    set is about that many (long rows, conversations, and a seeded subset of the text, in those shares): no
    conversation is sampled that the run would not reach. `progress(what, done, total)`."""
    from ..chat_fidelity import has_chat_template
    from ..convert.calibrate import chat_rows, read_data

    if tokenizer is None:
        raise KvconvertError("--data needs the teacher's tokenizer, and this model has none")
    data = read_data(paths)
    seqs = pack_text(tokenizer, data.text, seq_len) if data.text.strip() else torch.empty(0, seq_len, dtype=torch.long)
    origin = f"{len(paths)} file(s), {seqs.numel():,} tokens"
    if data.chats:
        if not has_chat_template(tokenizer):
            raise KvconvertError("--data: conversations need a chat template, and this model's tokenizer has none")
        if teacher is None:
            raise KvconvertError("--data: conversations need the teacher to answer them")
        text_rows = seqs.shape[0]
        n_chat = round(CHAT_SHARE / (1 - CHAT_SHARE) * text_rows) if text_rows else chat_seqs + val_seqs
        n_chat = max(n_chat, 2)
        digest = hashlib.sha256(json.dumps(data.chats, sort_keys=True).encode()).hexdigest()[:16]
        chats = made_once(
            lambda: chat_rows(teacher, tokenizer, data.chats, n_chat * seq_len, seq_len, seed,
                              progress and (lambda d, n: progress("answering the --data conversations", d, n))),
            cache_dir and cache_dir / f"answers-{digest}-{n_chat}x{seq_len}-{seed}.pt", world)
        held = max(1, round(val_seqs * n_chat / (n_chat + text_rows)))  # validation keeps the mix
        held_text = min(max(0, val_seqs - held), max(0, text_rows - 1))
        train = torch.cat([seqs[: text_rows - held_text], chats[: len(chats) - held]])
        val = torch.cat([seqs[text_rows - held_text :], chats[len(chats) - held :]])
        origin += f" and {len(data.chats):,} conversations answered by the teacher ({len(chats):,} sequences)"
        if train.shape[0] < batch_seqs:
            raise KvconvertError(f"--data: {train.shape[0]} training sequences, need at least {batch_seqs}")
        return TrainingData(train, val, origin, seed)
    need = val_seqs + batch_seqs
    if seqs.shape[0] < need:
        raise KvconvertError(
            f"--data: {seqs.shape[0] * seq_len:,} tokens, need at least {need * seq_len:,} "
            f"({val_seqs} validation + {batch_seqs} training sequences of --seq-len {seq_len})"
        )
    instruct = teacher is not None and has_chat_template(tokenizer)
    text_rows = seqs.shape[0] - val_seqs
    read, n_chat = train_seqs, round(CHAT_SHARE / (1 - CHAT_SHARE) * text_rows)  # all the text, a third as many chats
    if train_seqs is not None:  # as many sequences as the run reads: long rows, conversations, the rest text
        plain = max(1, round(train_seqs * (1 - LONG_SHARE if seq_len > SAMPLE_LEN else 1)))  # text and chats
        n_chat = max(1, round(CHAT_SHARE * plain)) if instruct else 0
        read = min(text_rows, max(1, plain - n_chat))
    chats = None
    if instruct:
        unique = min(n_chat, max(1, round(CHAT_SHARE * chat_seqs))) if chat_seqs else n_chat  # then cycled
        chats = teacher_chats(teacher, tokenizer, n_chat, unique, round(CHAT_SHARE * val_seqs) if val_seqs >= 4 else 0,
                              seq_len, seed, cache_dir,
                              progress and (lambda d, n: progress("sampling conversations from the teacher", d, n)),
                              world)
        origin += (f"; {len(chats[0]) + len(chats[1]):,} sequences of conversations the teacher wrote in its chat "
                   f"template ({CHAT_SHARE:.0%} of them and the text)")
    if seq_len <= SAMPLE_LEN:
        train, val = seqs[:-val_seqs], seqs[-val_seqs:]
        if chats is not None:
            train = torch.cat([text_read(train, read, seed), chats[0]])
            val = torch.cat([val[len(chats[1]) :], chats[1]])
        return TrainingData(train, val, origin, seed)
    return text_with_long_rows(seqs, val_seqs, seq_len, seed, tokenizer, origin, read, chats)


def save_whole(t: torch.Tensor, path: Path) -> None:
    """torch.save through a temporary name: a killed run never leaves a half file where a resume would read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(t, tmp)
    tmp.rename(path)


def made_once(make: Callable[[], torch.Tensor], path: Path | None, world: dist.World | None) -> torch.Tensor:
    """make(); with `path`, what the first of `world`'s processes made and saved there, read by every process (all
    train on the same sequences, and a resumed run on the ones it started with, without sampling them again)."""
    if path is None:
        return make().cpu()
    if (world is None or world.rank == 0) and not path.exists():
        save_whole(make().cpu(), path)
    if world is not None:
        dist.barrier(world)  # every process reaches it once per file, whoever made it
    return torch.load(path, weights_only=True)


def text_read(rows: torch.Tensor, train_seqs: int | None, seed: int) -> torch.Tensor:
    """The text sequences a run reads: `train_seqs` of them, a seeded subset in their order, when the text is longer
    (what is added beside the text is then a share of what the run trains on, not of a corpus it never reaches)."""
    if train_seqs is None or train_seqs >= rows.shape[0]:
        return rows
    pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:train_seqs]
    return rows[pick.sort().values]


def teacher_chats(teacher, tokenizer, train_seqs: int, unique: int, val_seqs: int, seq_len: int, seed: int,
                  cache_dir: Path | None = None, progress: Progress | None = None,
                  world: dist.World | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): `train_seqs` (`unique` of them sampled, then cycled) and `val_seqs` sequences of seq_len tokens
    packed from conversations the teacher writes in its own chat template, both turns sampled
    (calibrate.sample_chats); the two sets sampled apart. With `cache_dir`, the first of `world`'s processes samples
    and saves them there and every process reads that file (so all train on the same conversations, and a resumed
    run on the ones it started with); without, each samples them itself."""
    def rows(n: int, s: int, kind: str) -> torch.Tensor:
        if not n:
            return torch.empty(0, seq_len, dtype=torch.long)
        return made_once(lambda: sample_chats(teacher, tokenizer, n * seq_len, seq_len, s, progress),
                         cache_dir and cache_dir / f"chats-{kind}-{n}x{seq_len}-{s}.pt", world)

    train = rows(min(max(1, unique), train_seqs), seed, "train")
    if train_seqs:
        train = train[torch.arange(train_seqs) % train.shape[0]]
    return train, rows(val_seqs, seed + 1_000_003, "val")


def text_with_long_rows(seqs: torch.Tensor, val_seqs: int, seq_len: int, seed: int, tokenizer, origin: str,
                        train_seqs: int | None = None,
                        chats: tuple[torch.Tensor, torch.Tensor] | None = None) -> TrainingData:
    """Long sequences of text, beside recall and long-context task rows (`long_rows`) made from the same text, in the
    shares the data-free sequences have: text alone seldom asks for a token thousands back, which is what a
    converted model loses first. Training keeps the text sequences a run reads (`train_seqs` of them, a seeded subset
    when the text is longer: a large corpus is not turned into long rows a run never reaches) and the conversation
    sequences `chats` (train, val) brings, and adds long rows so that they are the same share of what it trains on;
    validation keeps its number of sequences (--val-tokens): the validation conversations, a share of long rows made
    from the held-out text only, and the held-out text."""
    share = LONG_SHARE
    train_text, val_text = seqs[:-val_seqs], seqs[-val_seqs:]

    def pool(rows: torch.Tensor) -> torch.Tensor:
        flat = rows.flatten()
        return flat[: flat.numel() // SAMPLE_LEN * SAMPLE_LEN].view(-1, SAMPLE_LEN)

    kinds = dict(recall_share=RECALL_SHARE / share, task_share=TASK_SHARE / share)
    train_text = text_read(train_text, train_seqs, seed)
    talk, val_talk = chats if chats is not None else (seqs[:0], seqs[:0])
    n_train = round(share / (1 - share) * (train_text.shape[0] + talk.shape[0]))
    extra, _ = long_rows(pool(train_text), n_train, seq_len, seed, tokenizer, **kinds)
    n_val = round(share * val_seqs) if val_seqs >= 2 else 0
    val_long_rows, val_far = long_rows(pool(val_text), n_val, seq_len, seed + 1, tokenizer, **kinds)
    plain = val_seqs - n_val - val_talk.shape[0]  # held-out text sequences kept
    val = torch.cat([val_text[:plain], val_talk, val_long_rows])
    val_long = torch.cat([torch.zeros(plain + val_talk.shape[0], seq_len, dtype=torch.bool), val_far])
    origin += f"; {n_train:,} recall and long-context task rows made from it ({share:.1%} of the sequences)"
    return TrainingData(torch.cat([train_text, talk, extra]), val, origin, seed, val_long=val_long if n_val else None)


def sampled(
    teacher,
    tokenizer,
    train_seqs: int,
    val_seqs: int,
    seq_len: int,
    seed: int,
    cache_dir: Path,
    world: dist.World,
    chunk_seqs: int = 32,
    progress: Progress | None = None,
    sample_len: int = SAMPLE_LEN,
) -> TrainingData:
    """Sequences sampled from the teacher (temperature 1, top-p 0.95), `sample_len` tokens at most each, in chunks of
    `chunk_seqs` (for an instruct teacher, CHAT_SHARE of each are conversations in its chat template); longer
    sequences are packed from them (`long_rows`). Chunk k is seeded by (seed, k) alone, so any number of processes
    (each generating the chunks k ≡ rank mod P) produces the same pool. Chunks are saved under `cache_dir` and reused
    by a resumed run."""
    from ..chat_fidelity import has_chat_template

    chats = has_chat_template(tokenizer)
    sample_len = min(seq_len, sample_len)
    per_seq = -(-seq_len // sample_len)  # samples a packed sequence takes
    n_train = -(-train_seqs * per_seq // chunk_seqs)
    n_val = -(-val_seqs * per_seq // chunk_seqs)
    keys = [f"train-{k}" for k in range(n_train)] + [f"val-{k}" for k in range(n_val)]
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = [key for i, key in enumerate(keys) if i % world.size == world.rank and not (cache_dir / f"{key}.pt").exists()]
    for done, key in enumerate(todo, 1):
        kind, k = key.split("-")
        chunk_seed = seed * 1_000_003 + int(k) * 2 + (kind == "val")
        n_chat = round(CHAT_SHARE * chunk_seqs) if chats else 0  # conversations in the teacher's template
        ids = sample_tokens(teacher, tokenizer, (chunk_seqs - n_chat) * sample_len, sample_len, chunk_seed,
                            batch=chunk_seqs)
        if n_chat:
            talk = sample_chats(teacher, tokenizer, n_chat * sample_len, sample_len, chunk_seed, batch=min(n_chat, 16))
            order = torch.randperm(chunk_seqs, generator=torch.Generator().manual_seed(chunk_seed))
            ids = torch.cat([ids, talk.to(ids.device)])[order]
        save_whole(ids.cpu(), cache_dir / f"{key}.pt")
        if progress:
            progress(done, len(todo))
    dist.barrier(world)
    load = lambda key: torch.load(cache_dir / f"{key}.pt", weights_only=True)  # noqa: E731
    train_pool = torch.cat([load(k) for k in keys[:n_train]])
    val_pool = torch.cat([load(k) for k in keys[n_train:]])
    if sample_len == seq_len:
        train, val, val_long = train_pool[:train_seqs], val_pool[:val_seqs], None
        origin = f"sampled from the teacher, {train.numel():,} tokens"
    else:
        train, _ = long_rows(train_pool, train_seqs, seq_len, seed, tokenizer)
        val, val_long = long_rows(val_pool, val_seqs, seq_len, seed + 1, tokenizer)
        origin = (f"sampled from the teacher, {train_pool.numel():,} tokens packed into {train_seqs:,} sequences of "
                  f"{seq_len:,} ({RECALL_SHARE:.0%} recall, {TASK_SHARE:.1%} long-context tasks)")
    return TrainingData(train, val, origin, seed, val_long=val_long)


def long_rows(pool: torch.Tensor, n: int, seq_len: int, seed: int, tokenizer=None, recall_share: float = RECALL_SHARE,
              task_share: float = TASK_SHARE) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (n, seq_len), long (n, seq_len) bool) packed from `pool` (P, s) rows, s <= seq_len, chosen seeded.

    Kinds, in seeded order: `recall` rows (a share `recall_share`) are [A, filler, A] with A one pool row (at most a
    quarter of the sequence) and the repeat at the very end, so the copy spans the whole sequence; `task` rows
    (`task_share`, only with a tokenizer) are a trial of kvconvert.longcontext's tasks in turn, its haystack the
    decoded text of pool rows, then its answers, then packed filler; the rest are pool rows end to end. `long` marks
    the tokens only far context predicts: the repeat after its first token, a task row's answers."""
    from ..longcontext import TASKS

    g = torch.Generator().manual_seed(seed)
    P, s = pool.shape
    at_least = 1 if n >= 2 else 0  # a short validation set still gets a row of each kind
    n_recall = max(at_least, round(recall_share * n)) if seq_len >= 8 and recall_share > 0 else 0
    n_task = max(at_least, round(task_share * n)) if tokenizer is not None and task_share > 0 else 0
    n_task = min(n_task, n - n_recall)
    kinds = ["recall"] * n_recall + ["task"] * n_task + ["packed"] * (n - n_recall - n_task)
    kinds = [kinds[i] for i in torch.randperm(n, generator=g).tolist()]

    def filler(length: int) -> torch.Tensor:
        picks = torch.randint(0, P, (-(-length // s),), generator=g)
        return pool[picks].flatten()[:length]

    rows = torch.empty(n, seq_len, dtype=torch.long)
    long = torch.zeros(n, seq_len, dtype=torch.bool)
    task_i = 0
    for i, kind in enumerate(kinds):
        if kind == "recall":
            a = pool[int(torch.randint(0, P, (1,), generator=g))][: max(2, min(s, seq_len // 4))]
            rows[i] = torch.cat([a, filler(seq_len - 2 * len(a)), a])
            long[i, seq_len - len(a) + 1 :] = True
        elif kind == "task":
            ids, answer = _task_ids(pool, tokenizer, seq_len, TASKS[task_i % len(TASKS)], TASK_SEED + seed * 1_000_003 + task_i, g)
            task_i += 1
            rows[i] = torch.cat([ids, filler(seq_len - len(ids))])
            long[i, answer] = True
        else:
            rows[i] = filler(seq_len)
    return rows, long


def _task_ids(pool: torch.Tensor, tokenizer, seq_len: int, task: str, trial_seed: int, g: torch.Generator):
    """(ids, answer positions) of one task row: a trial whose haystack is the teacher's own text, then its answers."""
    from ..longcontext import make_trial, text_sentences

    answer_room = 24
    P, s = pool.shape
    picks = torch.randint(0, P, (2 * -(-seq_len // s) + 1,), generator=g)
    text = " ".join(tokenizer.decode(pool[p], skip_special_tokens=True) for p in picks.tolist())
    # Sampled text may run on without a full stop (or a space): cut it into pieces short enough to put needles
    # between; where the teacher's text still does not fit, the generated haystack does.
    pieces = [p for sentence in text_sentences(text) for p in textwrap.wrap(sentence, 160)]
    length = max(64, seq_len - answer_room)
    trial = make_trial(task, tokenizer, length, trial_seed, pieces)
    if len(tokenizer(trial.prompt, add_special_tokens=False).input_ids) > length:
        trial = make_trial(task, tokenizer, length, trial_seed)
    prompt = tokenizer(trial.prompt, add_special_tokens=False).input_ids
    reply = tokenizer(" " + ", ".join(trial.answers) + ".", add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + prompt + reply)[:seq_len]
    start = min(len(bos) + len(prompt), seq_len)
    return torch.tensor(ids, dtype=torch.long), torch.arange(start, len(ids))
