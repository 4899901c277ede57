"""Cache policies for the runtime: `make_policy("zsmerge" | "h2o" | "streaming", budget)`."""

from __future__ import annotations

from ...errors import KvconvertError
from .base import TokenBudgetPolicy
from .h2o import H2O
from .streaming import StreamingLLM
from .zsmerge import ZSMerge

POLICIES = {"zsmerge": ZSMerge, "h2o": H2O, "streaming": StreamingLLM}

__all__ = ["POLICIES", "TokenBudgetPolicy", "make_policy"]


def make_policy(name: str, budget: float) -> TokenBudgetPolicy | None:
    """None for "full" (no policy)."""
    if name == "full":
        return None
    if name not in POLICIES:
        raise KvconvertError(f"--kv-policy must be one of full, {', '.join(POLICIES)}; got {name!r}")
    if not budget > 0:
        raise KvconvertError(f"--kv-budget must be a share of the context in (0, 1) or a token count >= 1, got {budget}")
    return POLICIES[name](budget=budget)
