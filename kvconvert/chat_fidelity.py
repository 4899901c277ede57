"""Chat fidelity: does a converted instruct model still answer as its source does?

On a seeded set of chat prompts (made from templates here, so no data is needed), each in the tokenizer's own chat
template, the reference (usually the source) answers greedily. Two numbers compare the model with it:
- teacher-forced top-1 agreement: along the reference's answer, the share of its tokens that are also the model's
  argmax given the same prefix (every answer token counts once);
- first-sentence match: the share of prompts whose greedy answer from the model begins with the reference answer's
  first sentence (whitespace collapsed), i.e. the model would say the same thing first.
"""

from __future__ import annotations

import math
import random
import re

import torch

from .errors import KvconvertError

_TEMPLATES = [
    ("What is the capital of {}?", ["France", "Japan", "Italy", "Canada", "Egypt", "Brazil", "Spain", "Kenya"]),
    ("Explain {} in one or two sentences.", ["photosynthesis", "gravity", "inflation", "a rainbow", "the tides",
                                               "compound interest", "a vaccine", "an eclipse"]),
    ("Give me three tips for {}.", ["sleeping better", "learning a language", "saving money", "running a first 5k",
                                     "keeping houseplants alive", "writing clearly", "studying for an exam"]),
    ("Write a short poem about {}.", ["the sea", "autumn leaves", "a lighthouse", "morning coffee", "the moon",
                                       "an old bicycle"]),
    ("What is {} plus {}?", [(12, 30), (7, 8), (125, 75), (19, 23), (300, 45)]),
    ("Translate '{}' into French.", ["good morning", "thank you very much", "where is the station",
                                      "I like apples"]),
    ("Who wrote {}?", ["Pride and Prejudice", "Hamlet", "Don Quixote", "The Odyssey", "War and Peace"]),
    ("Summarize the plot of {} in one sentence.", ["Romeo and Juliet", "Cinderella", "The Three Little Pigs",
                                                     "Robinson Crusoe"]),
]


def chat_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct user messages from the templates above, seeded; the templates take turns."""
    rng = random.Random(f"chat/{seed}")
    pools = [[t.format(*(f if isinstance(f, tuple) else (f,))) for f in fills] for t, fills in _TEMPLATES]
    for pool in pools:
        rng.shuffle(pool)
    order = list(range(len(pools)))
    rng.shuffle(order)
    out: list[str] = []
    while len(out) < n:
        before = len(out)
        for i in order:
            if pools[i] and len(out) < n:
                out.append(pools[i].pop())
        if len(out) == before:
            raise KvconvertError(f"at most {sum(len(f) for _, f in _TEMPLATES)} chat prompts are built in; asked for {n}")
    return out


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer, message: str) -> list[int]:
    """The user message in the tokenizer's chat template, ending where the assistant's answer begins."""
    from .runtime.chat import chat_template_ids

    return chat_template_ids(tokenizer, [{"role": "user", "content": message}])


def first_sentence(text: str) -> str:
    """Up to and including the first . ! ? or line break that ends a sentence, whitespace collapsed."""
    text = text.strip()
    m = re.search(r"[.!?](\s|$)|\n", text)
    return " ".join((text[: m.end()] if m else text).split())


def greedy_answer(model, ids: list[int], max_new_tokens: int, eos, pad) -> list[int]:
    """The model's greedy continuation of `ids` (up to max_new_tokens, stopping at eos)."""
    inp = torch.tensor([ids], device=next(model.parameters()).device)
    out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    return out[0, len(ids):].tolist()


@torch.no_grad()
def chat_agreement(model, reference, tokenizer, n_prompts: int = 8, max_new_tokens: int = 48, seed: int = 0,
                   progress=None) -> dict:
    """Teacher-forced top-1 agreement along the reference's greedy answers and the first-sentence match rate (see
    the module docstring), with each prompt's two answers."""
    if not has_chat_template(tokenizer):
        raise KvconvertError("the tokenizer has no chat template: chat agreement needs an instruct model")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    agree = total = same_first = 0
    examples = []
    margins, hits = [], []  # per answer token: the reference's top-2 logit gap, and whether the model's argmax agrees
    for i, message in enumerate(chat_prompts(n_prompts, seed)):
        ids = chat_ids(tokenizer, message)
        answer = greedy_answer(reference, ids, max_new_tokens, eos, pad)
        if answer:
            full = torch.tensor([ids + answer], device=next(model.parameters()).device)
            logits = model(full, use_cache=False).logits[0, len(ids) - 1 : -1]
            hit = logits.argmax(-1).cpu() == torch.tensor(answer)
            top2 = reference(full.to(next(reference.parameters()).device)).logits[0, len(ids) - 1 : -1].float().topk(2)
            margins.append((top2.values[:, 0] - top2.values[:, 1]).cpu())
            hits.append(hit)
            agree += hit.sum().item()
            total += len(answer)
        ours = greedy_answer(model, ids, max_new_tokens, eos, pad)
        ref_text = tokenizer.decode(answer, skip_special_tokens=True)
        our_text = tokenizer.decode(ours, skip_special_tokens=True)
        first = first_sentence(ref_text)
        same = bool(first) and " ".join(our_text.split()).startswith(first)
        same_first += same
        examples.append({"prompt": message, "reference": ref_text, "model": our_text, "same_first_sentence": same})
        if progress:
            progress(i + 1, n_prompts)
    return {"prompts": n_prompts, "max_new_tokens": max_new_tokens, "answer_tokens": total,
            "top1_agreement": agree / total if total else None, "first_sentence_match": same_first / n_prompts,
            "by_reference_margin": by_margin(torch.cat(margins), torch.cat(hits)) if margins else [],
            "examples": examples}


MARGIN_EDGES = (0.5, 1.0, 2.0)  # nats: the bins of by_margin


def by_margin(margins: torch.Tensor, hits: torch.Tensor) -> list[dict]:
    """Top-1 agreement per bin of the reference's margin (its top logit less its second, in nats; bins split at
    MARGIN_EDGES; the last bin's margin_to is None): where the reference nearly ties, any change of the model flips its argmax, so a model close to
    its reference still loses those tokens first. Empty bins are left out."""
    edges = [0.0, *MARGIN_EDGES, math.inf]
    out = []
    for lo, hi in zip(edges, edges[1:]):
        sel = (margins >= lo) & (margins < hi)
        if sel.any():
            out.append({"margin_from": lo, "margin_to": hi if hi < math.inf else None, "tokens": int(sel.sum()),
                        "top1_agreement": hits[sel].float().mean().item()})
    return out
