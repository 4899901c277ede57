"""Calibration: tokens (sampled from the source itself, or read from files) and per-layer attention inputs.

`Calibration.inputs[l]` is (N, hidden) float32: the normalized input of layer l's attention on N calibration
tokens. Second moments are taken with a constant 1 appended (x̃ = [x; 1]), so biases and means come for free:
`cov(i, j)` = E[x̃_i x̃_jᵀ], (hidden+1, hidden+1).

`Calibration.received[l]` is (N,): the attention each token receives at layer l in the source, Σ over the queries
that see it of their attention weight on it, averaged over heads (1 on average over a row). A token's key and value
move the attention outputs of the queries that read it in proportion to the weight they give it, so a latent fitted
to every token alike spends nothing on the few tokens most queries read: the first token (the attention sink) takes
a tenth of all attention in SmolLM2's middle layers, one of 256 calibration tokens. `weighted_cov` takes the moments
with each token weighted by (1 - β) + β × what it receives.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import KvconvertError

CHAT_SHARE = 0.25  # of calibration and distillation rows: conversations, for a source with a chat template

Progress = Callable[[int, int], None]


SAMPLE_PREFIX = 2  # a sampled row's first tokens: the start token and a random one (sample_tokens)


@contextmanager
def global_seed(model, seed: int):
    """generate() samples with torch's global generator: seeded for the block, the caller's state given back after
    it (a caller's random draws do not depend on whether it sampled or read its samples from a file)."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def start_token(model, tokenizer) -> int:
    """The token a sampled sequence starts with: the model's BOS, else the tokenizer's, else 0."""
    start = model.config.bos_token_id
    if start is None:
        start = tokenizer.bos_token_id if tokenizer is not None and tokenizer.bos_token_id is not None else 0
    return start


def sample_tokens(
    model, tokenizer, n_tokens: int, seq_len: int, seed: int = 0, progress: Progress | None = None, batch: int = 32
) -> torch.Tensor:
    """(S, seq_len) token ids sampled from the model itself (temperature 1, top-p 0.95): no data needed. Each row
    starts with SAMPLE_PREFIX tokens: the start token and a random one.
    Decode steps dominate: one batch of up to `batch` sequences costs about as much as one."""
    n_seq = max(1, -(-n_tokens // seq_len))
    start = start_token(model, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), global_seed(model, seed):
        for i in range(0, n_seq, batch):
            b = min(batch, n_seq - i)
            # A random second token diversifies the starts more than sampling alone would.
            first = torch.randint(0, model.config.vocab_size, (b, 1), generator=gen)
            ids = torch.cat([torch.full((b, 1), start), first], 1).to(device)
            seqs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                                  temperature=1.0, max_new_tokens=seq_len - 2, min_new_tokens=seq_len - 2,
                                  pad_token_id=start)
            out.append(seqs[:, :seq_len].cpu())
            if progress:
                progress(min(i + b, n_seq), n_seq)
    return torch.cat(out)[:n_seq]


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The chat template around one user message: (ids before the message, ids after it up to where the
    assistant's answer begins)."""
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(marker)
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(head), encode(tail)


def _sample(model, rows: list[list[int]], max_new: int, eos: int, pad: int) -> list[list[int]]:
    """Sampled continuations (temperature 1, top-p 0.95) of left-padded rows, each cut after its first EOS."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True, top_p=0.95,
                             temperature=1.0, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)
    new = []
    for row in out[:, width:].tolist():
        new.append(row[: row.index(eos) + 1] if eos in row else row)
    return new


def sample_chats(model, tokenizer, n_tokens: int, seq_len: int, seed: int = 0, progress: Progress | None = None,
                 batch: int = 16, user_tokens: int = 32, answer_tokens: int = 96) -> torch.Tensor:
    """(S, seq_len) conversations in the tokenizer's chat template, both turns sampled from the model itself (no
    data): after the template's user header and a random first token, the model writes a user message; after the
    assistant header, its answer. The conversations are packed end to end into rows of seq_len tokens."""
    head, tail = chat_frame(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = torch.Generator().manual_seed(seed + 1)
    n_seq = max(1, -(-n_tokens // seq_len))
    stream: list[int] = []
    with global_seed(model, seed + 1):
        while len(stream) < n_seq * seq_len:
            first = torch.randint(0, model.config.vocab_size, (batch,), generator=gen).tolist()
            users = _sample(model, [head + [f] for f in first], user_tokens, eos, pad)
            users = [[f] + [t for t in u if t != eos] for f, u in zip(first, users)]
            prompts = [head + u + tail for u in users]
            for p, answer in zip(prompts, _sample(model, prompts, answer_tokens, eos, pad)):
                stream += p + answer
            if progress:
                progress(min(len(stream), n_seq * seq_len), n_seq * seq_len)
    return torch.tensor(stream[: n_seq * seq_len]).view(n_seq, seq_len)


@dataclass
class DataFiles:
    """What --data files hold: plain text, and conversations (lists of {"role", "content"} messages)."""

    text: str
    chats: list[list[dict]]


def _conversation(obj: dict, where: str) -> list[dict] | None:
    """The messages of a JSONL line with "messages" (a conversation) or "prompt" (one user message), else None."""
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise KvconvertError(f"{where}: 'prompt' must be a non-empty string")
        return [{"role": "user", "content": obj["prompt"]}]
    if "messages" not in obj:
        return None
    msgs = obj["messages"]
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
    if not ok:
        raise KvconvertError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}}")
    if not any(m["role"] == "user" for m in msgs):
        raise KvconvertError(f"{where}: the conversation has no user message")
    return msgs


def read_data(paths: list[Path]) -> DataFiles:
    """Text of .txt files and of .jsonl lines with a "text" field; conversations of .jsonl lines with "messages"
    (chat messages, role and content) or "prompt" (one user message). Refuses empty, binary or malformed files."""
    from ..evaluate import read_text

    parts, chats = [], []
    for p in paths:
        text = read_text(p)
        if Path(p).suffix.lower() != ".jsonl":
            parts.append(text)
            continue
        lines, n_chats = [], len(chats)
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise KvconvertError(f"{p}:{n}: not a JSON line") from None
            if not isinstance(obj, dict):
                raise KvconvertError(f"{p}:{n}: a JSONL line must be an object")
            chat = _conversation(obj, f"{p}:{n}")
            if chat is not None:
                chats.append(chat)
            elif isinstance(obj.get("text"), str):
                lines.append(obj["text"])
            else:
                raise KvconvertError(f"{p}:{n}: a JSONL line needs a string field 'text', or 'prompt' or 'messages'")
        if not "\n\n".join(lines).strip() and len(chats) == n_chats:
            raise KvconvertError(f"{p}: no text in its 'text' fields and no conversations")
        if lines:
            parts.append("\n\n".join(lines))
    return DataFiles("\n\n".join(parts), chats)


def read_data_files(paths: list[Path]) -> str:
    """The plain text of --data files (read_data; conversations left out)."""
    return read_data(paths).text


def chat_rows(model, tokenizer, chats: list[list[dict]], n_tokens: int, seq_len: int, seed: int = 0,
              progress: Progress | None = None, batch: int = 8, answer_tokens: int = 96) -> torch.Tensor:
    """(S, seq_len) rows of the given conversations in the tokenizer's chat template, each answered by the model
    itself (sampled, as sample_chats does): the conversation up to its last user message, then the model's answer.
    The conversations are taken in a seeded order, again with new answers until n_tokens are packed."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen = torch.Generator().manual_seed(seed + 2)
    from ..runtime.chat import chat_template_ids

    last_user = lambda msgs: max(i for i, m in enumerate(msgs) if m["role"] == "user")  # noqa: E731
    prompts = [chat_template_ids(tokenizer, msgs[: last_user(msgs) + 1]) for msgs in chats]
    n_seq = max(1, -(-n_tokens // seq_len))
    stream: list[int] = []
    with global_seed(model, seed + 2):
        while len(stream) < n_seq * seq_len:
            order = torch.randperm(len(prompts), generator=gen).tolist()
            for i in range(0, len(order), batch):
                rows = [prompts[j][-(seq_len - 1):] for j in order[i : i + batch]]  # a long prompt: its end
                for p, answer in zip(rows, _sample(model, rows, answer_tokens, eos, pad)):
                    stream += p + answer
                if progress:
                    progress(min(len(stream), n_seq * seq_len), n_seq * seq_len)
                if len(stream) >= n_seq * seq_len:
                    break
    return torch.tensor(stream[: n_seq * seq_len]).view(n_seq, seq_len)


def tokens_from_text(tokenizer, text: str, n_tokens: int, seq_len: int, what: str = "--data") -> torch.Tensor:
    """(S, seq_len) consecutive windows of the text's tokens; refuses text shorter than what was asked for."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise KvconvertError(f"{what}: {len(ids):,} tokens, fewer than the {n_tokens:,} calibration tokens asked for (see --calib-tokens)")
    n_seq = max(1, n_tokens // seq_len)
    return torch.tensor(ids[: n_seq * seq_len]).view(n_seq, seq_len)


def long_calibration_rows(stream: torch.Tensor, n: int, length: int, row: int, seed: int, tokenizer=None,
                          lead: list[int] = (), recall_share: float | None = None,
                          task_share: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows (n, length), long (n, length) bool): rows with long-range dependencies packed from `stream` (1-D running
    text, cut into pieces of `row` tokens) as distillation packs its sequences (kvconvert.distill.data.long_rows: a
    recall row repeats its start at its end, a task row is a long-context trial and its answers; `long` marks the
    tokens only far context predicts; shares default to long_rows'), each beginning with the `lead` tokens (the start
    token a sampled row begins with, in place of the row's first ones). Short rows alone put few queries far from
    their keys in the statistics, and the fits then serve long-range attention poorly (docs/results.md, "Long
    calibration rows")."""
    from ..distill.data import RECALL_SHARE, TASK_SHARE, long_rows

    usable = stream.numel() // row * row
    if usable < 2 * row:
        raise KvconvertError(f"internal: {stream.numel()} calibration tokens cannot make long rows of {row}-token pieces")
    shares = dict(recall_share=RECALL_SHARE if recall_share is None else recall_share,
                  task_share=TASK_SHARE if task_share is None else task_share)
    rows, long = long_rows(stream[:usable].view(-1, row), n, length, seed, tokenizer, **shares)
    rows[:, : len(lead)] = torch.tensor(list(lead), dtype=rows.dtype)
    return rows, long


@dataclass
class Calibration:
    tokens: torch.Tensor  # (S, T) used for statistics
    inputs: list[torch.Tensor]  # per layer (N, hidden) float32: the rows of `chunks()` flattened, in order
    _cov: dict = field(default_factory=dict, repr=False)
    long: torch.Tensor | None = None  # (n, L) long rows, after the short ones in `inputs`
    batch: int = 8  # short rows per forward
    received: list[torch.Tensor] | None = None  # per layer (N,): the attention each token receives (module doc)

    def chunks(self) -> list[torch.Tensor]:
        """The token batches the statistics were collected on, in order: `tokens` `batch` rows at a time, then each
        long row alone."""
        out = [self.tokens[s : s + self.batch] for s in range(0, self.tokens.shape[0], self.batch)]
        return out + ([r[None] for r in self.long] if self.long is not None else [])

    @property
    def n(self) -> int:
        return self.inputs[0].shape[0]

    def cov(self, i: int, j: int) -> torch.Tensor:
        """E[x̃_i x̃_jᵀ] in float64, x̃ = [x; 1]."""
        return self._moment((), i, j, None)

    def _moment(self, tag: tuple, i: int, j: int, w: torch.Tensor | None) -> torch.Tensor:
        """moment(inputs[i], inputs[j], w), kept under `tag` (which names the weights w), or the transpose of (j, i)."""
        key = (*tag, i, j)
        if key not in self._cov:
            if (*tag, j, i) in self._cov:
                return self._cov[(*tag, j, i)].T
            self._cov[key] = moment(self.inputs[i], self.inputs[j], w)
        return self._cov[key]

    def token_weights(self, layers: tuple[int, ...], beta: float) -> torch.Tensor | None:
        """(N,) float64: (1 - β) + β × the attention each token receives, averaged over `layers` and scaled to mean 1;
        None when every token weighs the same (β = 0, or nothing received was recorded)."""
        if not beta or self.received is None:
            return None
        r = torch.stack([self.received[layer] for layer in layers]).double().mean(0)
        return (1 - beta) + beta * r / r.mean().clamp_min(1e-12)

    def weighted_cov(self, layers: tuple[int, ...], beta: float) -> Callable[[int, int], torch.Tensor]:
        """cov(i, j) with each token weighted by token_weights(layers, beta) (the moments of a layer group's fit:
        `layers` are the group's); the plain `cov` where the weights are all 1."""
        w = self.token_weights(layers, beta)
        if w is None:
            return self.cov

        return lambda i, j: self._moment(("weighted", layers, beta), i, j, w)

    def cov_pinv(self, i: int) -> torch.Tensor:
        """The pseudo-inverse of cov(i, i) (kept: every layer group starting at layer i needs it)."""
        key = ("pinv", i)
        if key not in self._cov:
            self._cov[key] = torch.linalg.pinv(self.cov(i, i))
        return self._cov[key]


def moment(xi: torch.Tensor, xj: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """E_w[x̃_i x̃_jᵀ] in float64 over the rows of xi, xj (N, h), x̃ = [x; 1], rows weighted by w (N,) (None: alike)."""
    xi, xj = xi.double(), xj.double()
    w = torch.ones(xi.shape[0], dtype=torch.float64) if w is None else w.double()
    xw = xi * w[:, None]
    top = torch.cat([xw.T @ xj, xw.sum(0)[:, None]], 1)
    bottom = torch.cat([(xj * w[:, None]).sum(0), w.sum()[None]])[None]
    return torch.cat([top, bottom], 0) / w.sum()


RECEIVED_QUERIES = 512  # queries per row whose attention is summed (evenly spaced; all of a shorter row's)


def received_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                       max_queries: int = RECEIVED_QUERIES) -> torch.Tensor:
    """(B, S) float32: for each key position, Σ over queries of the attention weight they give it, averaged over
    heads. query (B, H, T, D) and key (B, K, S, D) as an attention function of transformers receives them (normed,
    rotated; K divides H); mask as it receives it: None (causal, T ≤ S, the queries the last T positions), a bool
    mask (True: attend) or an additive float mask, (B or 1, 1, T, S). Rows longer than `max_queries` sum an evenly
    spaced subset of their queries, scaled by the stride."""
    B, H, T, _ = query.shape
    S = key.shape[2]
    idx = torch.arange(T) if T <= max_queries else torch.linspace(0, T - 1, max_queries).round().long()
    q = query[:, :, idx].float()
    k = key.float().repeat_interleave(H // key.shape[1], 1)
    scores = (q @ k.transpose(-1, -2)).mul_(scaling)  # (B, H, n, S); in place from here: a long row's are large
    if mask is None:
        allowed = torch.arange(S)[None, :] <= (idx + S - T)[:, None]
        scores.masked_fill_(~allowed.to(scores.device), float("-inf"))
    elif mask.dtype == torch.bool:
        scores.masked_fill_(~mask[:, :, idx.to(mask.device)], float("-inf"))
    else:
        scores.add_(mask[:, :, idx.to(mask.device)].float())
    p = torch.softmax(scores, -1)
    if mask is not None:
        p.nan_to_num_()  # a fully masked query (padding) gives nothing; a causal one always sees itself
    return p.sum(2).mean(1) * (T / len(idx))


@contextmanager
def recording_received(model, store: list[list[torch.Tensor]]):
    """Within the block, every attention call of `model` (a transformers model) also appends the attention its keys
    receive (received_attention, flattened) to store[layer]: the model's own attention function computes the
    outputs, so its forward is unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = "kvconvert_received"
    before = model.config._attn_implementation

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if before in ALL_ATTENTION_FUNCTIONS:
            inner = ALL_ATTENTION_FUNCTIONS[before]
        else:  # eager: the function of the module's own modeling file
            inner = sys.modules[type(module).__module__].eager_attention_forward
        out = inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        store[module.layer_idx].append(received_attention(query, key, attention_mask, scale).reshape(-1).cpu())
        return out

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[before if before in
                                                                               ALL_MASK_ATTENTION_FUNCTIONS else "eager"])
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def collect_inputs(model, tokens: torch.Tensor, batch: int = 8, progress: Progress | None = None,
                   long: torch.Tensor | None = None, received: bool = True) -> Calibration:
    """Run the source on `tokens` (and on `long` rows, one at a time, when given) and keep every layer's attention
    input (after its input norm) and, with `received`, the attention each token receives; `Calibration.tokens` are
    the `tokens`."""
    layers = model.model.layers
    got: list[list[torch.Tensor]] = [[] for _ in layers]
    cal = Calibration(tokens, [], long=long, batch=batch)
    chunks = cal.chunks()
    # Each layer's inputs go straight into one (N, hidden) tensor: collected in pieces and joined, the inputs of
    # every layer would be held twice at the join.
    n = sum(c.numel() for c in chunks)
    cal.inputs = [torch.empty(n, model.config.hidden_size) for _ in layers]
    at = [0] * len(layers)

    def hook(idx):
        def fn(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None).reshape(-1, model.config.hidden_size)
            cal.inputs[idx][at[idx] : at[idx] + len(x)] = x.float()
            at[idx] += len(x)

        return fn

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with recording_received(model, got) if received else nullcontext():
            for i, chunk in enumerate(chunks):
                model.model(chunk, use_cache=False)  # the layers only: no logits (4,096 x 49,152 floats for SmolLM2)
                if progress:
                    progress(i + 1, len(chunks))
    finally:
        for h in handles:
            h.remove()
    assert at == [n] * len(layers), "internal: the calibration forwards did not fill the inputs"
    if received:
        cal.received = [torch.cat(r) for r in got]
        assert all(len(r) == cal.n for r in cal.received), "internal: received attention does not match the inputs"
    return cal
