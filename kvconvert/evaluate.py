"""Evaluation: perplexity on a text, agreement with a reference model, passkey retrieval.

Perplexity protocol (fixed, so numbers compare across models and runs):
  the text is tokenized without special tokens (no BOS); the first `max_tokens` tokens are cut into
  non-overlapping windows of `window` tokens (a trailing partial window is dropped); each window is run
  on its own from an empty cache and its tokens 2..window are scored (window - 1 predictions per window).
  perplexity = exp(mean negative log-likelihood over all scored predictions).
With a reference model on the same tokens: top-1 agreement = share of predictions where both argmaxes
match; KL = mean over predictions of KL(reference || model) on the full next-token distributions.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import KvconvertError

Progress = Callable[[int, int], None]  # (done, total)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, refusing missing, binary and empty files with one line."""
    p = Path(path)
    if not p.is_file():
        raise KvconvertError(f"{path}: no such file")
    data = p.read_bytes()
    if b"\x00" in data[:65536]:
        raise KvconvertError(f"{path}: binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KvconvertError(f"{path}: not UTF-8 text") from None
    if not text.strip():
        raise KvconvertError(f"{path}: empty text")
    return text


def text_windows(tokenizer, text: str, window: int, max_tokens: int) -> torch.Tensor:
    """(N, window) token ids following the protocol above; refuses text shorter than one window."""
    if window < 2:
        raise KvconvertError(f"--window must be at least 2, got {window}")
    if max_tokens < window:
        raise KvconvertError(f"--max-tokens ({max_tokens}) must be at least --window ({window})")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    n = len(ids) // window
    if n == 0:
        raise KvconvertError(f"text too short: {len(ids)} tokens, need at least one window of {window} (see --window)")
    return torch.tensor(ids[: n * window]).view(n, window)


@torch.no_grad()
def score_windows(
    model,
    windows: torch.Tensor,
    reference=None,
    batch_size: int = 4,
    progress: Progress | None = None,
    score_last: int | None = None,
) -> dict:
    """Perplexity of `model` on (N, W) windows; with `reference`, top-1 agreement, KL(reference || model) and the
    reference's own perplexity on the same predictions.
    score_last: score only each window's last `score_last` tokens (long-window perplexity: the tokens with the
    most context behind them); None: tokens 2..W."""
    device = next(model.parameters()).device
    nll_sum, ref_nll_sum, kl_sum, agree, count = 0.0, 0.0, 0.0, 0, 0
    N, W = windows.shape
    first = 1 if score_last is None else W - score_last  # the first scored token
    if not 1 <= first < W:
        raise KvconvertError(f"can score the last 1..{W - 1} tokens of {W}-token windows, not {score_last}")
    for start in range(0, N, batch_size):
        ids = windows[start : start + batch_size].to(device)
        logp = F.log_softmax(model(ids, use_cache=False).logits[:, first - 1 : -1].float(), dim=-1)
        target = ids[:, first:]
        nll_sum += -logp.gather(-1, target[..., None]).sum().item()
        count += target.numel()
        if reference is not None:
            ref_device = next(reference.parameters()).device
            ref_logits = reference(ids.to(ref_device), use_cache=False).logits[:, first - 1 : -1]
            ref_logp = F.log_softmax(ref_logits.float(), -1).to(device)
            ref_nll_sum += -ref_logp.gather(-1, target[..., None]).sum().item()
            kl_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        if progress:
            progress(min(start + batch_size, N), N)
    out = {
        "windows": N,
        "window": W,
        "scored_per_window": W - first,
        "predictions": count,
        "nll": nll_sum / count,
        "perplexity": math.exp(nll_sum / count),
    }
    if reference is not None:
        out["top1_agreement"] = agree / count
        out["kl"] = kl_sum / count
        out["reference_perplexity"] = math.exp(ref_nll_sum / count)
    return out


PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, key: int, depth: float) -> list[int]:
    """Token ids of a prompt of about `length` tokens hiding `key` at relative `depth` (0 = start, 1 = end)."""
    sentences = [s.strip() + " " for s in PASSKEY_FILLER.split(". ") if s.strip()]
    sentences = [s if s.endswith(". ") else s.rstrip() + ". " for s in sentences]
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    fixed = count(PASSKEY_INTRO + PASSKEY_NEEDLE.format(key=key) + PASSKEY_QUESTION)
    per_sentence = count("".join(sentences) * 4) / (4 * len(sentences))
    n = max(1, round((length - fixed) / per_sentence))
    filler = [sentences[i % len(sentences)] for i in range(n)]
    before = round(n * depth)
    text = PASSKEY_INTRO + "".join(filler[:before]) + PASSKEY_NEEDLE.format(key=key) + "".join(filler[before:]) + PASSKEY_QUESTION
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def score_windows_with_policy(
    model, windows: torch.Tensor, policy_factory, score_last: int, chunk: int = 256, prompt_chunk: int | None = None,
    progress: Progress | None = None, prompt_only: bool = False, repeat: list[int] | None = None,
) -> dict:
    """Perplexity of the last `score_last` tokens of each (N, W) window, run through the latent-cache runtime with
    a cache policy (`policy_factory()` -> a fresh policy, or None for the full cache): the first W - score_last
    tokens are the prompt, prefilled and compressed to the budget once (as ZSMerge and kvpress do) or after every
    `prompt_chunk` tokens; the scored tokens then go through in chunks of `chunk`, compressed back to the budget
    after each, or with `prompt_only` (kvpress's protocol) added to the compressed prompt uncompressed. Budget
    shares are of the window length W. repeat: `repeat_ids`, for policies scored by reconstruction."""
    from .runtime import LatentRuntime

    N, W = windows.shape
    if not 0 < score_last < W:
        raise KvconvertError(f"--score-last must be in [1, {W - 1}] for {W}-token windows, got {score_last}")
    device = next(model.parameters()).device
    nll_sum, count, per_window = 0.0, 0, []
    for n in range(N):
        policy = policy_factory()
        ctx = W - score_last
        first = min(prompt_chunk or ctx, ctx)
        room = max(prompt_room(policy, first, repeat), W - ctx if prompt_only else chunk)
        rt = LatentRuntime.for_context(model, 1, W, policy, prefill_chunk=room, cuda_graphs=False)
        ids = windows[n : n + 1].to(device)
        logits = [compress_prompt(rt, ids[0, :ctx].tolist(), repeat, first if policy is not None else None)[:, None]]
        if prompt_only and policy is not None:
            policy.hold()
        for lo in range(ctx, W - 1, chunk):
            part = ids[:, lo : min(lo + chunk, W - 1)]
            logits.append(rt.prefill(part, [part.shape[1]], all_logits=True))
        logp = F.log_softmax(torch.cat(logits, 1).float(), -1)  # predicts tokens ctx .. W-1
        target = ids[:, ctx:]
        nll = -logp.gather(-1, target[..., None]).sum().item()
        nll_sum += nll
        count += target.numel()
        per_window.append(nll / target.numel())
        if progress:
            progress(n + 1, N)
    return {"windows": N, "window": W, "scored_per_window": score_last, "predictions": count,
            "nll": nll_sum / count, "perplexity": math.exp(nll_sum / count), "window_nll": per_window}


REPEAT_PROMPT = "\n\nNow write the text above out again, word for word:\n"  # the reading `--kv-score reconstruct` scores by


def repeat_ids(tokenizer) -> list[int]:
    """REPEAT_PROMPT as token ids (no special tokens)."""
    return tokenizer(REPEAT_PROMPT, add_special_tokens=False).input_ids


def compress_prompt(rt, ids: list[int], repeat: list[int] | None, chunk: int | None = None) -> torch.Tensor:
    """Prefill a fresh batch-1 runtime with `ids` and compress them to its policy's budget: scored by reconstruction
    (`repeat`: the instruction read before each chunk, `repeat_ids`) where the policy says so, else by its
    attention, once at the end or after every `chunk` tokens. Returns the logits (1, vocab) at the last token."""
    if rt.policy is not None and rt.policy.scoring == "reconstruct":
        if repeat is None:
            raise ValueError("reconstruction scores need the repeat instruction's ids")
        return rt.prefill_reconstructed(ids, repeat)
    return rt.prefill_chunked(torch.tensor([ids], device=rt.device), [len(ids)], chunk=chunk)


def prompt_room(policy, n: int, repeat: list[int] | None) -> int:
    """Cache slots past a policy's budget that compressing an n-token prompt at once needs."""
    from .runtime.policies.base import RECONSTRUCT_CHUNK

    if policy is not None and policy.scoring == "reconstruct":
        return n + len(repeat or []) + RECONSTRUCT_CHUNK
    return n


def runtime_generator(model, policy_factory, max_new_tokens: int = 8, prompt_chunk: int | None = None,
                      repeat: list[int] | None = None, query_aware: bool = False):
    """A greedy `generate(ids, max_new=max_new_tokens, context=None) -> new ids` through the latent-cache runtime
    with a cache policy. Without `context` the whole prompt is compressed to the budget once after its prefill, or
    after every `prompt_chunk` tokens (the question, if it closes the prompt, takes part in choosing what is kept).
    With `context` (query-agnostic, kvpress's protocol) only the prompt's first `context` tokens are compressed; the
    rest (the question) and the reply are added to the compressed cache uncompressed; `query_aware` ignores
    `context`. repeat: `repeat_ids`, for policies scored by reconstruction."""
    from .runtime import LatentRuntime, SamplingOptions

    def generate(ids: list[int], max_new: int = max_new_tokens, context: int | None = None) -> list[int]:
        policy = policy_factory()
        if policy is None or query_aware or not context or context >= len(ids):
            context = len(ids) - 1 if policy is not None and policy.scoring == "reconstruct" else len(ids)
        room = max(prompt_room(policy, context, repeat), len(ids) - context + max_new)
        rt = LatentRuntime.for_context(model, 1, len(ids) + max_new, policy, prefill_chunk=room, cuda_graphs=False)
        opts = SamplingOptions(max_new_tokens=max_new)
        if context == len(ids):
            rt.prefill_chunk = min(prompt_chunk or len(ids), len(ids))
            return rt.generate([ids], opts)[0][0]
        compress_prompt(rt, ids[:context], repeat, prompt_chunk)
        if policy is not None:
            policy.hold()
        return rt.generate([ids[context:]], opts)[0][0]

    return generate


def passkey_trials(tokenizer, lengths: list[int], trials: int, seed: int = 0) -> Iterator[tuple[int, int, list[int]]]:
    """(length, key, prompt ids) of every trial: seeded keys, the key's depth spread evenly over the trials."""
    rng = random.Random(seed)
    for length in lengths:
        for t in range(trials):
            key = rng.randint(10000, 99999)
            yield length, key, passkey_prompt(tokenizer, length, key, (t + 0.5) / trials)


def passkey_context(tokenizer, ids: list[int]) -> int:
    """How many of a passkey prompt's ids come before its question (one fewer where the question's first token
    merged with the text's last)."""
    question = tokenizer(PASSKEY_QUESTION, add_special_tokens=False).input_ids
    return len(ids) - len(question) - (ids[-len(question):] != question)


def passkey_found(answer: str, key: int) -> bool:
    """A trial passes when the first number of the answer is the key."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == str(key)


@torch.no_grad()
def passkey_accuracy(
    model, tokenizer, lengths: list[int], trials: int = 5, seed: int = 0, progress: Progress | None = None,
    generate=None,
) -> list[dict]:
    """Greedy-decode the answer to each prompt; a trial passes when the first number generated is the key.
    `generate(ids, context=n) -> new ids` replaces the model's own generate (e.g. `runtime_generator` with a cache
    policy; n: the prompt's ids before its question).
    Each length's `passed` lists its trials' outcomes in order: the trials depend only on the seed, so two models or
    policies can be compared trial by trial."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    passed, n_tokens = [[] for _ in lengths], [0] * len(lengths)
    total = len(lengths) * trials
    for done, (_, key, ids) in enumerate(passkey_trials(tokenizer, lengths, trials, seed), 1):
        row = (done - 1) // trials  # trials come length by length
        n_tokens[row] = len(ids)
        if generate is not None:
            new = generate(ids, context=passkey_context(tokenizer, ids))
        else:
            inp = torch.tensor([ids], device=device)
            out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=8, do_sample=False, pad_token_id=pad)
            new = out[0, len(ids) :]
        passed[row].append(passkey_found(tokenizer.decode(new, skip_special_tokens=True), key))
        if progress:
            progress(done, total)
    return [{"length": n, "prompt_tokens": n_tokens[r], "trials": trials, "accuracy": sum(passed[r]) / trials,
             "passed": passed[r]} for r, n in enumerate(lengths)]
