"""Cache policies for the runtime: `make_policy("zsmerge" | "h2o" | "streaming", budget)`."""

from __future__ import annotations

from ...errors import KvconvertError
from .base import SCORINGS, TokenBudgetPolicy
from .h2o import H2O
from .streaming import StreamingLLM
from .zsmerge import ZSMerge

POLICIES = {"zsmerge": ZSMerge, "h2o": H2O, "streaming": StreamingLLM}
# the options each policy takes beside its budget: merge slots are ZSMerge's; StreamingLLM scores nothing and keeps
# sinks and a recent window only
KNOBS = {"zsmerge": ("recent", "residual", "decay", "queries", "score"), "h2o": ("recent", "decay", "queries", "score"),
         "streaming": ()}

__all__ = ["POLICIES", "TokenBudgetPolicy", "make_policy"]


def make_policy(name: str, budget: float, recent: float | None = None, residual: float | None = None,
                decay: float | None = None, queries: float | None = None, score: str | None = None,
                ) -> TokenBudgetPolicy | None:
    """None for "full" (no policy). recent / residual / decay / queries (the prompt's last queries whose attention
    scores the prompt) / score (how a prompt compressed whole is scored: base.SCORINGS) override the policy's
    defaults (the papers')."""
    if name == "full":
        return None
    if name not in POLICIES:
        raise KvconvertError(f"--kv-policy must be one of full, {', '.join(POLICIES)}; got {name!r}")
    if not budget > 0:
        raise KvconvertError(f"--kv-budget must be a share of the context in (0, 1) or a token count >= 1, got {budget}")
    given = {"recent": recent, "residual": residual, "decay": decay, "queries": queries, "score": score}
    foreign = [k for k, v in given.items() if v is not None and k not in KNOBS[name]]
    if foreign:
        takes = ", ".join(f"--kv-{k}" for k in KNOBS[name]) or "no option but --kv-budget"
        raise KvconvertError(f"--kv-policy {name} does not take --kv-{foreign[0]} (it takes {takes})")
    knobs = {k: v for k, v in (("recent", recent), ("residual", residual), ("decay", decay)) if v is not None}
    for k, v in knobs.items():
        if not (0 < v <= 1 if k != "residual" else 0 <= v < 1):
            raise KvconvertError(f"--kv-{k} must be in {'[0, 1)' if k == 'residual' else '(0, 1]'}, got {v}")
    if queries is not None:
        if queries < 1 or queries != int(queries):
            raise KvconvertError(f"--kv-queries must be a whole number of queries >= 1, got {queries:g}")
        knobs["prefill_queries"] = int(queries)
    if score is not None:
        if score not in SCORINGS:
            raise KvconvertError(f"--kv-score must be one of {', '.join(SCORINGS)}; got {score!r}")
        knobs["scoring"] = score
    return POLICIES[name](budget=budget, **knobs)
