"""StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): the first tokens (attention sinks) and a recent window;
the oldest other token is dropped. No attention scores needed."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import TokenBudgetPolicy


@dataclass
class StreamingLLM(TokenBudgetPolicy):
    sinks: int = 4
    recent: float = 1.0
    residual: float = 0.0
    scored: bool = False
    name: str = field(default="streaming", init=False)
