"""ZSMerge (Liu, Liu, Tang 2025, arXiv 2503.10714): heavy hitters by exponentially decayed accumulated attention,
a recent window, and residual merge slots with compensated (log-count) attention scores.

Defaults follow the authors' LLaMA2-7B 5%-budget ablation anchor: half the budget recent, 2% of the rest (at least
one slot) for merging, decay 0.98 per step; prompt tokens are scored by the decayed attention of the prompt's last
queries. The authors budget each kv head; here the budget is per layer group, whose latent every head reads. On the
source model (identity conversion, where heads could choose apart) that costs 0.2-0.4% perplexity at 5%
(bench/studies/head_granularity.py over runtime/policies/reference.py; docs/results.md, cache policies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import TokenBudgetPolicy


@dataclass
class ZSMerge(TokenBudgetPolicy):
    recent: float = 0.5
    residual: float = 0.02
    decay: float = 0.98
    scored: bool = True
    name: str = field(default="zsmerge", init=False)
