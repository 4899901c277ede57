"""H2O (Zhang et al. 2023, arXiv 2306.14048): heavy hitters by accumulated attention plus a recent window;
evicted tokens are dropped. The baseline that shows what ZSMerge's merging adds."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import TokenBudgetPolicy


@dataclass
class H2O(TokenBudgetPolicy):
    recent: float = 0.5
    residual: float = 0.0
    decay: float = 1.0
    scored: bool = True
    name: str = field(default="h2o", init=False)
