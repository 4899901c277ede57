"""Sampling a token from logits (`SamplingOptions`, `sample`) and the timings of one generation (`GenerationStats`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KvconvertError


@dataclass
class SamplingOptions:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; stop tokens end a row (not included in its output)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise KvconvertError("--max-new-tokens must be at least 1")
        if self.temperature < 0:
            raise KvconvertError("--temperature must be >= 0")
        if self.top_k < 0:
            raise KvconvertError("--top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise KvconvertError("--top-p must be in (0, 1]")


def sample(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) int64."""
    if opts.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / opts.temperature
    if opts.top_k and opts.top_k < logits.shape[-1]:
        kth = logits.topk(opts.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > opts.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0

    batch: int = 1

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (the first new token of each row comes from the prefill)."""
        return self.steps * self.batch / self.decode_s if self.decode_s else 0.0
