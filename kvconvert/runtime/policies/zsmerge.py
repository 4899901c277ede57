"""ZSMerge (Liu, Liu, Tang 2025, arXiv 2503.10714): heavy hitters by exponentially decayed accumulated attention,
a recent window, and residual merge slots with compensated (log-count) attention scores.

Defaults follow the authors' LLaMA2-7B 5%-budget ablation anchor (half the budget recent, decay 0.98 per step;
prompt tokens scored by the decayed attention of the prompt's last queries) except the merge slots, which are off:
measured on SmolLM2 they cost on text (5% budget, 12 windows of 4,096 tokens: 1.076x the full cache's perplexity
with them against 1.070x without, 10 of 12 windows lower without) and changed no trial of the long-context suite at
25% or 10% (docs/results.md, cache policies). `--kv-residual 0.02` gives the authors' 2% of the non-recent budget.
The authors budget each kv head; here the budget is per layer group, whose latent every head reads. On the source
model (identity conversion, where heads could choose apart) that costs 0.2-0.4% perplexity at 5%
(bench/studies/head_granularity.py over runtime/policies/reference.py; docs/results.md, cache policies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import TokenBudgetPolicy


@dataclass
class ZSMerge(TokenBudgetPolicy):
    recent: float = 0.5
    residual: float = 0.0  # merge slots: the authors' 0.02, off by default (see above)
    decay: float = 0.98
    scored: bool = True
    name: str = field(default="zsmerge", init=False)
