"""Parameter grids in two tiers: every pair of values in the default run, the whole product in the slow tier.

A bug that depends on one parameter value, or on two values together, shows in some combination of a pairwise
covering set; the full product (`python -m pytest -q -m slow`) adds the higher-order combinations. The covering set
is chosen greedily and deterministically (the first combination covering the most uncovered pairs), so a test id
is in the same tier on every run.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import pytest


def pairwise_cover(axes: Sequence[Sequence], valid: Callable[..., bool] = lambda *c: True) -> list[tuple]:
    """A subset of the valid combinations of `axes` in which every pair of values (from two different axes) that
    some valid combination holds appears at least once; with one axis, every value."""
    combos = [c for c in itertools.product(*axes) if valid(*c)]
    if len(axes) < 2:
        return combos

    def pairs(c: tuple) -> set:
        return {(i, c[i], j, c[j]) for i, j in itertools.combinations(range(len(c)), 2)}

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: len(pairs(c) & uncovered))  # max keeps the first of equals
        chosen.append(best)
        uncovered -= pairs(best)
    return [c for c in combos if c in chosen]  # in product order


def grid(axes: dict[str, Sequence], valid: Callable[..., bool] = lambda *c: True, ids: dict | None = None) -> list:
    """pytest.param for every valid combination of `axes` (name -> values); those outside the pairwise cover are
    marked `slow`. Use as @pytest.mark.parametrize(",".join(axes), grid(axes)). ids: name -> function of a value
    giving its id part (default str)."""
    ids = ids or {}
    values = list(axes.values())
    cover = set(pairwise_cover(values, valid))
    params = []
    for combo in itertools.product(*values):
        if not valid(*combo):
            continue
        name = "-".join(ids.get(k, str)(v) for k, v in zip(axes, combo))
        marks = () if combo in cover else (pytest.mark.slow,)
        params.append(pytest.param(*combo, id=name, marks=marks))
    return params
