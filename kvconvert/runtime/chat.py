"""A chat session over the runtime: the model's chat template, a cache that keeps the conversation, streaming.

Each turn renders the whole conversation with the chat template, keeps the longest prefix the cache already holds
and prefills only the rest. Without a chat template the session is plain continuation of the text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import kv_bytes
from ..errors import KvconvertError
from . import GenerationStats, LatentRuntime, SamplingOptions


def stop_tokens(generation_config, tokenizer) -> tuple[int, ...]:
    """The generation config's eos ids (an int or a list) and the tokenizer's eos id."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if eos is not None:
        ids += [eos] if isinstance(eos, int) else list(eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))


def chat_template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the chat template and a generation prompt (a plain list: transformers
    may return a BatchEncoding)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TurnStats:
    prompt_tokens: int  # tokens prefilled this turn
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    cached_tokens: int
    kv_bytes_in_use: int
    kv_bytes_allocated: int


class ChatSession:
    def __init__(self, runtime: LatentRuntime, tokenizer, system: str | None = None):
        if tokenizer is None:
            raise KvconvertError("this model folder has no tokenizer: chat needs one")
        if runtime.cache.batch != 1:
            raise ValueError("a chat session uses a cache of one row")
        self.rt = runtime
        self.tok = tokenizer
        self.system = system
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []  # the tokens the cache holds, in order
        self.text = ""  # plain-continuation mode: the whole text so far
        self.rt.reset()

    def _render(self) -> list[int]:
        if self.templated:
            return chat_template_ids(self.tok, self.messages)
        return self.tok.encode(self.text)  # the whole text every turn, with the tokenizer's BOS as turn one had it

    def reply(
        self, user_text: str, opts: SamplingOptions, on_text: Callable[[str], None] | None = None
    ) -> tuple[str, TurnStats]:
        """Answer one user turn; `on_text` receives the reply as it is generated (decoded incrementally)."""
        if self.templated:
            self.messages.append({"role": "user", "content": user_text})
        else:
            self.text += user_text
        ids = self._render()
        if len(ids) >= self.rt.context:
            if self.templated:
                self.messages.pop()
            else:
                self.text = self.text[: -len(user_text)]
            raise KvconvertError(
                f"context full: the conversation needs {len(ids):,} tokens of a {self.rt.context:,}-token "
                "context (/reset, or a larger --context)"
            )
        # Keep the longest common prefix of the cache and the new rendering (a reply re-tokenized from its text, or
        # a template that rewrites history, may differ from what was cached), recompute the rest.
        keep = common_prefix(self.cached, ids, limit=len(ids) - 1)  # at least one token to prefill, for its logits
        self.rt.truncate(keep)
        keep = self.rt.seen[0]  # a cache policy may have had to start over
        self.cached = self.cached[:keep]
        new = ids[keep:]
        room = self.rt.context - len(ids) + 1
        opts = SamplingOptions(**{**opts.__dict__, "max_new_tokens": min(opts.max_new_tokens, room)})
        out: list[int] = []
        shown = ""

        def stream(_row: int, token: int) -> None:
            nonlocal shown
            out.append(token)
            text = self.tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if on_text is not None and not text.endswith("\ufffd"):  # wait for the rest of a UTF-8 character
                on_text(text[len(shown) :])
                shown = text

        outputs, stats = self.rt.generate([new], opts, on_token=stream)
        reply = self.tok.decode(outputs[0], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if on_text is not None and len(reply) > len(shown):
            on_text(reply[len(shown) :])
        self.cached = (self.cached + new + outputs[0])[: self.rt.seen[0]]  # the tokens the cache has seen
        if self.templated:
            self.messages.append({"role": "assistant", "content": reply})
        else:
            self.text += reply
        return reply, self.turn_stats(stats)

    def turn_stats(self, stats: GenerationStats) -> TurnStats:
        cache = self.rt.cache
        return TurnStats(
            prompt_tokens=stats.prompt_tokens,
            new_tokens=stats.new_tokens,
            prefill_tokens_per_s=stats.prompt_tokens / stats.prefill_s if stats.prefill_s else 0.0,
            decode_tokens_per_s=stats.decode_tokens_per_s,
            cached_tokens=self.rt.lengths[0],
            kv_bytes_in_use=kv_bytes(cache.config, self.rt.lengths[0], cache.ring_chunk),
            kv_bytes_allocated=cache.nbytes,
        )


def auto_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise KvconvertError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KvconvertError("--device cuda: no CUDA device is available")
    return device


def auto_dtype(dtype: str, device: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise KvconvertError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return names[dtype]
