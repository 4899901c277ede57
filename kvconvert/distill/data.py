"""Training sequences for distillation: packed from text files, or sampled from the teacher (data-free).

Both give `TrainingData`: `train` (N, seq_len) and a held-out `val` (M, seq_len) int64 token ids. The order of
training sequences is a pure function of (seed, position): epoch e visits `train` in a permutation seeded by
(seed, e), so a resumed run — or a run split over P processes — sees exactly the sequences a straight run would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..convert.calibrate import read_data_files, sample_tokens
from ..errors import KvconvertError
from . import dist

Progress = Callable[[int, int], None]


@dataclass
class TrainingData:
    train: torch.Tensor  # (N, seq_len) int64
    val: torch.Tensor  # (M, seq_len) int64, never trained on
    origin: str
    seed: int = 0
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


def from_files(tokenizer, paths: list[Path], seq_len: int, val_seqs: int, batch_seqs: int, seed: int) -> TrainingData:
    """Pack --data files; the last `val_seqs` sequences are held out (a contiguous slice: no overlap with training)."""
    if tokenizer is None:
        raise KvconvertError("--data needs the teacher's tokenizer, and this model has none")
    seqs = pack_text(tokenizer, read_data_files(paths), seq_len)
    need = val_seqs + batch_seqs
    if seqs.shape[0] < need:
        raise KvconvertError(
            f"--data: {seqs.shape[0] * seq_len:,} tokens, need at least {need * seq_len:,} "
            f"({val_seqs} validation + {batch_seqs} training sequences of --seq-len {seq_len})"
        )
    return TrainingData(seqs[:-val_seqs], seqs[-val_seqs:], f"{len(paths)} file(s), {seqs.numel():,} tokens", seed)


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
) -> TrainingData:
    """Sequences sampled from the teacher (temperature 1, top-p 0.95) in chunks of `chunk_seqs`; chunk k is seeded
    by (seed, k) alone, so any number of processes (each generating the chunks k ≡ rank mod P) produces the same
    pool. Chunks are saved under `cache_dir` and reused by a resumed run."""
    n_train = -(-train_seqs // chunk_seqs)
    n_val = -(-val_seqs // chunk_seqs)
    keys = [f"train-{k}" for k in range(n_train)] + [f"val-{k}" for k in range(n_val)]
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = [key for i, key in enumerate(keys) if i % world.size == world.rank and not (cache_dir / f"{key}.pt").exists()]
    for done, key in enumerate(todo, 1):
        kind, k = key.split("-")
        chunk_seed = seed * 1_000_003 + int(k) * 2 + (kind == "val")
        ids = sample_tokens(teacher, tokenizer, chunk_seqs * seq_len, seq_len, chunk_seed, batch=chunk_seqs)
        tmp = cache_dir / f".{key}.pt.tmp"
        torch.save(ids.cpu(), tmp)
        tmp.rename(cache_dir / f"{key}.pt")  # a killed run never leaves a half chunk
        if progress:
            progress(done, len(todo))
    dist.barrier(world)
    load = lambda key: torch.load(cache_dir / f"{key}.pt", weights_only=True)  # noqa: E731
    train = torch.cat([load(k) for k in keys[:n_train]])[:train_seqs]
    val = torch.cat([load(k) for k in keys[n_train:]])[:val_seqs]
    return TrainingData(train, val, f"sampled from the teacher, {train.numel():,} tokens", seed)
