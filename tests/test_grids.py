"""The test tiers' grids: the default run holds every pair of parameter values, the slow tier the rest."""

import itertools

import pytest

from grids import grid, pairwise_cover


def pairs(combos):
    return {(i, c[i], j, c[j]) for c in combos for i, j in itertools.combinations(range(len(c)), 2)}


@pytest.mark.parametrize("axes", [[[16, 8, 4, "4+2"], [1, 2], ["wide", "folded", "narrow"], [False, True]],
                                  [["zsmerge", "h2o", "streaming"], [16, 4], ["cached", "from latent"]],
                                  [[1, 2, 3]]])
def test_pairwise_cover_holds_every_pair_and_is_smaller(axes):
    valid = lambda *c: not (c[-1] is True and c[0] in (8, "4+2"))  # noqa: E731  (as test_runtime's qk_norm rule)
    every = [c for c in itertools.product(*axes) if valid(*c)]
    cover = pairwise_cover(axes, valid)
    assert set(cover) <= set(every) and pairs(cover) == pairs(every)
    assert len(cover) < len(every) or len(axes) < 3
    assert cover == pairwise_cover(axes, valid)  # deterministic: a test id stays in its tier


def test_grid_marks_all_but_the_cover_slow():
    params = grid(dict(a=[1, 2, 3], b=["x", "y"], c=[True, False]), valid=lambda a, b, c: (a, b) != (3, "y"))
    assert len(params) == 10 and len({p.id for p in params}) == 10
    fast = [p.values for p in params if not p.marks]
    assert pairs(fast) == pairs([p.values for p in params])
    assert all([m.name for m in p.marks] == ["slow"] for p in params if p.marks)
