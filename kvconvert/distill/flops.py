"""The arithmetic of a distillation step, for tokens/s → model FLOP utilization (MFU).

Model FLOPs per training token, as MFU is usually counted (recomputation left out: it is work the hardware does,
not work the step needs): the student's forward and backward, 3 × (2 × its matrix weights + attention), and the
teacher's forward, 2 × its matrix weights + attention. Matrix weights are the nn.Linear weights (the LM head
included, embedding lookups not); attention is causal, so a token attends on average to half the sequence:
2 × 2 × (seq_len / 2) × heads × head_dim a layer (scores and values).
"""

from __future__ import annotations

import torch


def linear_weights(model) -> int:
    """Elements of the model's nn.Linear weights: two FLOPs each per token in a forward."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs of causal attention per token: scores and values over half the sequence on average, in every
    layer (a sliding window caps the span)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    windows = getattr(config, "layer_windows", None)  # a CLLA model's; a source's from its config
    if windows is None:
        from ..convert.identity import source_layer_windows

        windows = source_layer_windows(config, config.model_type)
    total = 0.0
    for w in windows:
        span = min(seq_len, w) if w else seq_len
        total += 2 * 2 * (span / 2) * heads * head_dim
    return total


def distill_flops_per_token(student, teacher, seq_len: int) -> float:
    """Model FLOPs of one training token: the student's forward and backward, the teacher's forward."""
    s = 2 * linear_weights(student) + attention_flops_per_token(student.config, seq_len)
    t = 2 * linear_weights(teacher) + attention_flops_per_token(teacher.config, seq_len)
    return 3 * s + t
