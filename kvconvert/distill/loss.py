"""The distillation loss and validation: KL(teacher ‖ student) per token from the models' final hidden states, a
chunk of tokens at a time (never a sequence's whole vocabulary-wide logits), plus an optional hidden-state term.

loss = T² · KL(teacher_T ‖ student_T) per token (T: temperature), plus, with `hidden_weight` > 0, the mean over
layers of ‖h_student − h_teacher‖² / ‖h_teacher‖².
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from . import dist

LOGIT_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}  # one chunk's float32 logits, by device (logit_chunk_tokens)


def logit_chunk_tokens(chunk: int | None, vocab: int, device) -> int | None:
    """Tokens whose full-vocabulary logits exist at once in the loss: `chunk` as given (0: no chunking, None
    returned), or by default (None) as many as fill LOGIT_CHUNK_BYTES of float32 logits on the device. The loss
    holds a few such tensors at a time (both models' log-probabilities, their difference), so on CPU 64 MiB a chunk
    keeps the loss's peak near a quarter of a GB (at 1,024 tokens of a 49k vocabulary it was about 1.4 GB)."""
    if chunk is not None:
        return chunk or None
    kind = torch.device(device).type
    return max(1, LOGIT_CHUNK_BYTES.get(kind, LOGIT_CHUNK_BYTES["cpu"]) // (4 * vocab))


@contextlib.contextmanager
def captured_final_hidden(model):
    """A list that receives the model's final normed hidden states (B, T, h) each time it runs forward: a hook on
    its final norm. A forward asked for one position's logits (logits_to_keep=1) and no hidden states then keeps the
    whole sequence's final states and nothing more; output_hidden_states would keep every layer's output too (for a
    teacher in inference mode, 31 tensors of the sequence instead of one, for SmolLM2)."""
    out: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_hook(lambda module, args, output: out.append(output))
    try:
        yield out
    finally:
        handle.remove()


def model_hidden(forward, model, ids: torch.Tensor, layers: bool = False):
    """(final normed hidden states (B, T, h), every layer's output as transformers orders them or None without
    `layers`) of `model` on `ids`, run through `forward` (the model itself, or its data-parallel wrapper)."""
    if layers:
        hs = forward(ids, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states
        return hs[-1], hs
    with captured_final_hidden(model) as out:
        forward(ids, use_cache=False, logits_to_keep=1)
    return out[-1], None


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """The model's logits from its final (normed) hidden states: the LM head, then any logit soft-capping."""
    logits = model.lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _chunk_kl(s_h, t_h, student, teacher, temperature: float) -> torch.Tensor:
    """Σ over a chunk's tokens of KL(teacher_T ‖ student_T), both models' logits made from their hidden states."""
    s = F.log_softmax(head_logits(student, s_h).float() / temperature, dim=-1)
    with torch.no_grad():
        t = F.log_softmax(head_logits(teacher, t_h).float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum()


def chunked_kl(s_h, t_h, student, teacher, temperature: float, chunk: int | None) -> torch.Tensor:
    """T² · mean KL(teacher_T ‖ student_T) over tokens, from final hidden states (B, T, h), `chunk` tokens at a time
    (None: all at once): each chunk's logits are made, reduced and dropped, and made again in backward (activation
    checkpointing), so no more than one chunk of either model's full-vocabulary logits exists at once."""
    from torch.utils.checkpoint import checkpoint

    s_h, t_h = s_h.reshape(-1, s_h.shape[-1]), t_h.reshape(-1, t_h.shape[-1])
    n = s_h.shape[0]
    chunk = chunk or n
    total = sum(checkpoint(_chunk_kl, s_h[i : i + chunk], t_h[i : i + chunk], student, teacher, temperature,
                           use_reentrant=False) for i in range(0, n, chunk))
    return total / n * temperature**2


def hidden_loss(s_hidden, t_hidden) -> torch.Tensor | None:
    """Mean over layer outputs 1..L-1 of ‖h_s − h_t‖² / ‖h_t‖² (hidden states as transformers orders them:
    embeddings, then each layer; the last is the final norm's output, which the logits already cover)."""
    terms = [((a.float() - b.float()).pow(2).sum(-1) / b.float().pow(2).sum(-1).clamp_min(1e-6)).mean()
             for a, b in zip(s_hidden[1:-1], t_hidden[1:-1])]
    return torch.stack(terms).mean() if terms else None


def distill_loss(s_logits, t_logits, temperature: float, s_hidden=None, t_hidden=None, hidden_weight: float = 0.0):
    """(loss, kl): logits (B, T, V), all at once: the definition that `chunked_kl` (what training runs) is tested
    against."""
    s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1).mean() * temperature**2
    loss = kl
    if hidden_weight > 0 and (h := hidden_loss(s_hidden, t_hidden)) is not None:
        loss = loss + hidden_weight * h
    return loss, kl.detach()


@torch.no_grad()
def validate(student, teacher, val: torch.Tensor, batch: int, device, autocast, world: dist.World,
             val_long: torch.Tensor | None = None, chunk: int | None = None) -> dict:
    """Mean KL(teacher ‖ student), top-1 agreement and student perplexity on held-out sequences (T = 1); with
    `val_long` (a mask of `val`'s tokens only far context predicts, data.long_rows) also `long_kl`, the mean KL on
    those tokens. Every sequence counts once, whatever the number of processes (`validation_sums`)."""
    student.eval()
    sums = validation_sums(student, teacher, val, batch, device, autocast, world, val_long, chunk)
    student.train()
    kl_sum, nll_sum, agree, n, long_sum, n_long = dist.sum_all(world, sums)
    out = {"kl": kl_sum / n, "top1": agree / n, "ppl": math.exp(nll_sum / n)}
    return out | ({"long_kl": long_sum / n_long} if n_long else {})


def validation_sums(student, teacher, val: torch.Tensor, batch: int, device, autocast, world: dist.World,
                    val_long: torch.Tensor | None = None, chunk: int | None = None) -> list[float]:
    """This process's [KL sum, NLL sum, top-1 agreements, tokens, long-range KL sum, long-range tokens] on its share
    of `val`: the sequences rank·k … rank·k + k − 1, k = ⌈N / processes⌉. Under FSDP every forward is collective, so
    all processes run k sequences; past N a process repeats the last sequence and counts none of its tokens."""
    chunk = logit_chunk_tokens(chunk, student.config.vocab_size, device)
    per = -(-val.shape[0] // world.size)
    idx = torch.arange(world.rank * per, (world.rank + 1) * per)
    counted = idx < val.shape[0]
    idx = idx.clamp(max=val.shape[0] - 1)
    long = val_long[idx] if val_long is not None else torch.zeros((per, val.shape[1]), dtype=torch.bool)
    val = val[idx]
    kl_sum = nll_sum = agree = n = long_sum = n_long = 0.0
    for i in range(0, per, batch):
        ids = val[i : i + batch].to(device)
        with autocast():
            s_h, t_h = model_hidden(student, student, ids)[0], model_hidden(teacher, teacher, ids)[0]
            s_h, t_h, target = s_h[:, :-1].flatten(0, 1), t_h[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
            keep = counted[i : i + batch, None].expand(-1, ids.shape[1] - 1).flatten().to(device)
            far = long[i : i + batch, 1:].flatten().to(device) & keep
            step = chunk or target.numel()  # logit_chunk_tokens: None is no chunking
            for c in range(0, target.numel(), step):
                s = F.log_softmax(head_logits(student, s_h[c : c + step]).float(), -1)
                t = F.log_softmax(head_logits(teacher, t_h[c : c + step]).float(), -1)
                k = keep[c : c + step]
                kl = (t.exp() * (t - s)).sum(-1)
                kl_sum += kl[k].sum().item()
                long_sum += kl[far[c : c + step]].sum().item()
                nll_sum += -s.gather(-1, target[c : c + step, None])[k].sum().item()
                agree += (s.argmax(-1) == t.argmax(-1))[k].sum().item()
        n += keep.sum().item()
        n_long += far.sum().item()
    return [kl_sum, nll_sum, agree, n, long_sum, n_long]
