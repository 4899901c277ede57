"""Layer layouts: which consecutive layers share one latent (a layer group), as tuples of layer indices.

A group never mixes layer kinds (`layer_kinds`): its layers share one cache stream, so one sliding window and one
RoPE frequency table.
"""

from __future__ import annotations

from ..config import CllaConfig

Layout = tuple[tuple[int, ...], ...]  # the layer groups, in order, covering every layer once


def size_runs(groups) -> list[list[int]]:
    """[count, size] of each run of consecutive layer groups of one size."""
    runs: list[list[int]] = []
    for g in groups:
        if runs and runs[-1][1] == len(g):
            runs[-1][0] += 1
        else:
            runs.append([1, len(g)])
    return runs


def describe_layout(groups) -> str:
    """E.g. "2 groups of 1 + 14 groups of 2"."""
    return " + ".join(f"{n} group{'s' if n > 1 else ''} of {k}" for n, k in size_runs(groups))


def prefix_length(groups) -> int:
    """Layers in the leading run of groups as large as the first."""
    count, size = size_runs(groups)[0]
    return count * size


def layer_kinds(base: CllaConfig) -> list[tuple]:
    """Per layer, what a layer group must share: its sliding window (None: full attention) and its RoPE frequency
    table (Gemma 3's sliding and global layers differ in both)."""
    return [(base.layer_windows[i], base.rope_freq_index[i][0][0]) for i in range(base.num_hidden_layers)]


def uniform_groups(L: int, size: int, kinds: list | None = None) -> Layout:
    """Consecutive groups of `size` layers; with `kinds` (per layer), each run of layers of one kind is grouped on
    its own (the last group of a run may be smaller)."""
    return prefix_groups(L, size, size, 0, kinds)


def prefix_groups(L: int, first: int, rest: int, m: int, kinds: list | None = None) -> Layout:
    """Consecutive groups: of `first` layers while a group starts below layer m, of `rest` layers after; each run
    of layers of one kind (see `uniform_groups`) is grouped on its own."""
    kinds = kinds or [None] * L
    groups, start = [], 0
    for i in range(1, L + 1):
        if i == L or kinds[i] != kinds[start]:
            j = start
            while j < i:
                size = first if j < m else rest
                groups.append(tuple(range(j, min(j + size, i))))
                j += size
            start = i
    return tuple(groups)


def mixed_group(groups, kinds: list) -> tuple[int, ...] | None:
    """The first group that mixes layer kinds, or None."""
    return next((tuple(g) for g in groups if len({kinds[i] for i in g}) > 1), None)
