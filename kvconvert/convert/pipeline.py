"""`kvconvert convert`: load the source, build the CLLA model for the plan, check it, export atomically.

The stages are exposed one by one (`Conversion`) so that a caller can put work between the build and the export:
`kvconvert convert --distill-tokens` trains the built model (kvconvert.distill) before it is checked and written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..config import SUPPORTED_KV_BITS, default_plan_context
from ..errors import KvconvertError
from .build import ATTENTION_WEIGHT, Compressor
from .groups import layer_kinds, mixed_group
from .calibrate import (CHAT_SHARE, SAMPLE_PREFIX, chat_rows, collect_inputs, long_calibration_rows, read_data,
                        read_data_files, sample_chats, sample_tokens, start_token, tokens_from_text)
from .plan import QUANT_GROUPS, TAIL_BITS, Overrides, RecallProbe, choose_plan, fit_target, proxy_error
from .export import atomic_folder, check_output, conversion_record, write_conversion_json, write_model
from .identity import build_identity, own_weights
from .precision import check_judge_dtype, forwards_in, judge_dtype
from .source import Source, SourceRef, load_source, load_source_config, model_type_of, resolve

Log = Callable[[str], None]


@dataclass
class ConvertOptions:
    identity: bool = False
    kv_ratio: float | None = None
    context: int | None = None  # tokens per row --kv-ratio is planned at (None: plan_context, from the model)
    overrides: Overrides = field(default_factory=Overrides)
    group_sizes: list[int] | None = None  # --groups, checked against the layer count once the source is known
    data: list[Path] = field(default_factory=list)
    calib_tokens: int = 3072
    heldout_tokens: int = 512
    seq_len: int = 256
    long_rows: int = 2  # calibration rows of long_len tokens beside the short ones (0: none; see long_calibration)
    long_len: int = 4096  # at most the model's positions
    probe_rows: int = 4  # rows of the planner's recall probe (recall_probe); 0: no long-range judge
    attention_weight: float = ATTENTION_WEIGHT  # β of the fits' token weights (calibrate.Calibration.weighted_cov)
    refit: bool = False  # the winner also refitted group by group (plan.choose_plan, convert/sequential.py)
    top_up: bool = False  # the bytes the winner leaves spent per layer group (plan.choose_plan, plan.water_fill)
    seed: int = 0
    force: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    judge_dtype: str = "auto"  # sampling and the planner's judge: auto | float32 | bfloat16 (convert/precision.py)
    check_tokens: int = 64  # tokens of the logit check against the source
    log: Log = field(default=lambda msg: None)
    progress: Callable[[str, int, int], None] = field(default=lambda what, done, total: None)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, source: Source) -> torch.dtype:
    if name == "auto":
        # A GGUF source is dequantized to float32; a folder keeps the dtype its config declares.
        return DTYPES.get(source.declared_dtype or "float32", torch.float32)
    if name not in DTYPES:
        raise KvconvertError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name}")
    return DTYPES[name]


def check_tokens(tokenizer, vocab_size: int, n: int) -> torch.Tensor:
    """Tokens for the source-vs-converted logit check: real text when a tokenizer exists, else random ids."""
    text = (
        "The latent cache stores a few numbers per token instead of every key and value. "
        "It was a bright cold day in April, and the clocks were striking thirteen. "
    ) * 8
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
        return torch.tensor([ids])
    return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def max_relative_logit_error(a_model, b_model, ids: torch.Tensor) -> float:
    a = a_model(ids).logits.float()
    b = b_model(ids).logits.float()
    return ((a - b).abs().max() / a.abs().max()).item()


def check_options(opts: ConvertOptions) -> None:
    """Refuse contradictory or out-of-range options before any work starts."""
    ov = opts.overrides
    if opts.kv_ratio is not None and not 0 < opts.kv_ratio <= 1:
        raise KvconvertError(f"--kv-ratio must be in (0, 1], got {opts.kv_ratio}")
    if opts.context is not None and opts.context < 1:
        raise KvconvertError(f"--context must be a number of tokens >= 1, got {opts.context}")
    if opts.identity and opts.context is not None:
        raise KvconvertError("--identity is the exact plan; it takes no --context (a --kv-ratio's)")
    if opts.identity and (opts.kv_ratio is not None or ov.any() or opts.group_sizes):
        raise KvconvertError("--identity is the exact plan; it takes no --kv-ratio or plan options")
    if not opts.identity and opts.kv_ratio is None and ov.latent_dim is None:
        raise KvconvertError("say what to build: --kv-ratio R (e.g. 0.1), --identity, or --latent-dim with plan options")
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise KvconvertError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {opts.dtype}")
    check_judge_dtype(opts.judge_dtype)
    if ov.group_size is not None and opts.group_sizes:
        raise KvconvertError("--group-size and --groups contradict each other; give one")
    for name, value in (("--kv-bits", ov.kv_bits), ("--rope-bits", ov.rope_bits)):
        if value is not None and value not in SUPPORTED_KV_BITS:
            raise KvconvertError(f"{name} must be one of {', '.join(map(str, sorted(SUPPORTED_KV_BITS)))}; got {value}")
    if ov.tail_dim is not None:
        if ov.tail_dim < 0:
            raise KvconvertError(f"--kv-tail-dim must be non-negative, got {ov.tail_dim}")
        if ov.tail_dim and ov.latent_dim is not None and ov.tail_dim >= ov.latent_dim:
            raise KvconvertError(f"--kv-tail-dim {ov.tail_dim} must be smaller than --latent-dim {ov.latent_dim} "
                                 "(the tail is the latent's last dims)")
        groups = [ov.quant_group] if ov.quant_group else list(QUANT_GROUPS)
        if ov.tail_dim and all(ov.tail_dim % g for g in groups):
            raise KvconvertError(f"--kv-tail-dim {ov.tail_dim} must be a multiple of the quantization group "
                                 f"({' or '.join(map(str, groups))}; --quant-group sets it)")
        if ov.tail_dim and ov.kv_bits is not None and ov.kv_bits <= TAIL_BITS:
            raise KvconvertError(f"a {TAIL_BITS}-bit tail needs a wider latent head: --kv-bits {ov.kv_bits} leaves "
                                 "nothing to save (drop --kv-tail-dim, or raise --kv-bits)")
    if ov.rope_keys == "latent" and ov.rope_bits not in (None, 16):
        raise KvconvertError(f"--rope-keys latent caches no rope keys: --rope-bits {ov.rope_bits} has nothing to set")
    if ov.rope_keys == "latent" and ov.rope_dim == 0:
        raise KvconvertError("--rope-keys latent needs rope keys to reconstruct: --rope-dim 0 leaves none")
    for name, value in (("--latent-dim", ov.latent_dim), ("--group-size", ov.group_size), ("--quant-group", ov.quant_group),
                        ("--rope-heads", ov.rope_heads)):
        if value is not None and value < 1:
            raise KvconvertError(f"{name} must be positive, got {value}")
    if ov.rope_dim is not None and (ov.rope_dim < 0 or ov.rope_dim % 2):
        raise KvconvertError(f"--rope-dim must be even and non-negative, got {ov.rope_dim}")
    if opts.calib_tokens < 256:
        raise KvconvertError(f"--calib-tokens must be at least 256, got {opts.calib_tokens}")
    if opts.long_rows < 0:
        raise KvconvertError(f"--calib-long-rows must be 0 or more, got {opts.long_rows}")
    if opts.probe_rows < 0:
        raise KvconvertError(f"--probe-rows must be 0 or more, got {opts.probe_rows}")
    if not 0 <= opts.attention_weight <= 1:
        raise KvconvertError(f"--attention-weight must be in [0, 1], got {opts.attention_weight}")


def check_overrides_against(config, opts: ConvertOptions) -> Overrides:
    """Plan options that need the model's shapes; returns the overrides with --groups resolved."""
    ov = opts.overrides
    L, D, K = config.num_hidden_layers, config.head_dim, config.num_key_value_heads
    if ov.latent_dim is not None and ov.latent_dim > config.hidden_size:
        raise KvconvertError(f"--latent-dim {ov.latent_dim} exceeds the hidden size {config.hidden_size}")
    if ov.tail_dim and ov.tail_dim >= config.hidden_size:
        raise KvconvertError(f"--kv-tail-dim {ov.tail_dim} leaves no latent head within the hidden size "
                             f"{config.hidden_size}")
    if ov.rope_dim is not None and ov.rope_dim > D:
        raise KvconvertError(f"--rope-dim {ov.rope_dim} exceeds the head dim {D}")
    if ov.rope_heads is not None and ov.rope_heads not in (1, K):
        raise KvconvertError(f"--rope-heads must be 1 (shared) or {K} (one per kv head), got {ov.rope_heads}")
    if ov.group_size is not None and ov.group_size > L:
        raise KvconvertError(f"--group-size {ov.group_size} exceeds the {L} layers")
    if opts.group_sizes:
        if sum(opts.group_sizes) != L or min(opts.group_sizes) < 1:
            raise KvconvertError(f"--groups sizes must be positive and add up to the {L} layers, got {opts.group_sizes}")
        starts = [sum(opts.group_sizes[:i]) for i in range(len(opts.group_sizes))]
        groups = tuple(tuple(range(s, s + n)) for s, n in zip(starts, opts.group_sizes))
        ov = Overrides(**(vars(ov) | {"groups": groups}))
    mixed = mixed_group(ov.groups or (), layer_kinds(config))
    if mixed:
        raise KvconvertError(f"--groups: layers {list(mixed)} are of different kinds (sliding-window and full attention, "
                             "or different RoPE bases); a group shares one latent, so it takes layers of one kind")
    if ov.rope_heads == K and K > 1 and (ov.group_size not in (None, 1) or (ov.groups and max(map(len, ov.groups)) > 1)):
        raise KvconvertError("one rope head per kv head (--rope-heads K) needs one layer per group")
    return ov


RECALL_PROBE_TOKENS = 2048  # the planner's long-range judge (plan.RecallProbe): rows this long (or the positions)
PROBE_SEED = 7_919  # the probe rows' packing seed, apart from the long calibration rows'


def row_length(source, cap: int) -> int:
    """`cap` tokens, or the source's positions where it takes fewer."""
    return min(cap, getattr(source.model.config, "max_position_embeddings", None) or cap)


def recall_probe(source, stream: torch.Tensor, lead: list[int], opts: ConvertOptions) -> RecallProbe | None:
    """The planner's long-range judge: opts.probe_rows rows packed from the calibration text (half recall rows, half
    long-context trials when the source has a tokenizer and there are two rows or more), each scored on the tokens
    only far context predicts. One row alone ranked layouts by chance (docs/results.md); each row costs a forward of
    RECALL_PROBE_TOKENS per judged plan."""
    length = row_length(source, RECALL_PROBE_TOKENS)
    if not opts.probe_rows or length < 4 * opts.seq_len or stream.numel() < 2 * opts.seq_len:
        return None
    task = 0.5 if source.tokenizer is not None and opts.probe_rows >= 2 else 0.0
    rows, long = long_calibration_rows(stream, opts.probe_rows, length, opts.seq_len, opts.seed + PROBE_SEED,
                                       source.tokenizer, lead, recall_share=1 - task, task_share=task)
    return RecallProbe.from_rows(rows, long)


class CalibrationRows(NamedTuple):
    calib: torch.Tensor  # (S, seq_len)
    heldout: torch.Tensor  # (M, seq_len): the planner's held-out rows
    origin: str
    stream: torch.Tensor  # 1-D: the calibration rows as running text (sampled rows without their first tokens)
    lead: list[int]  # the tokens a row of this origin starts with (sampled: the start token)


def calibration_tokens(source, opts: ConvertOptions) -> CalibrationRows:
    """(S, seq_len) calibration and held-out token rows from --data, or sampled from the source itself; an instruct
    source (one with a chat template) also gets CHAT_SHARE of both as conversations in its template."""
    from ..chat_fidelity import has_chat_template

    n = opts.calib_tokens + opts.heldout_tokens
    n_held = max(1, opts.heldout_tokens // opts.seq_len)
    if opts.data:
        if source.tokenizer is None:
            raise KvconvertError("--data needs the source's tokenizer, and this source has none")
        data = read_data(opts.data)
        if data.chats and not has_chat_template(source.tokenizer):
            raise KvconvertError("--data: conversations need a chat template, and this source's tokenizer has none")
        if not data.chats:
            tokens = tokens_from_text(source.tokenizer, data.text, n, opts.seq_len)
            return _data_rows(tokens[:-n_held], tokens[-n_held:], f"{len(opts.data)} file(s)")
        # conversations, answered by the source; beside text they take CHAT_SHARE of the rows
        n_chat = n // opts.seq_len if not data.text.strip() else max(1, round(CHAT_SHARE * n / opts.seq_len))
        held_chat = n_held if not data.text.strip() else max(1, round(CHAT_SHARE * n_held))
        chats = chat_rows(source.model, source.tokenizer, data.chats, n_chat * opts.seq_len, opts.seq_len, opts.seed,
                          lambda d, t: opts.progress("answering the --data conversations", d, t))
        what = f"{len(opts.data)} file(s): {len(data.chats):,} conversations answered by the source"
        if n_chat * opts.seq_len >= n:
            return _data_rows(chats[:-n_held], chats[-n_held:], what)
        text = tokens_from_text(source.tokenizer, data.text, n - n_chat * opts.seq_len, opts.seq_len)
        return _data_rows(*_mix(text, chats, n_held - held_chat, held_chat), what + " and text")
    progress = lambda d, t: opts.progress("sampling calibration text", d, t)  # noqa: E731
    lead = [start_token(source.model, source.tokenizer)]
    if not has_chat_template(source.tokenizer) or n_held < 2:
        tokens = sample_tokens(source.model, source.tokenizer, n, opts.seq_len, opts.seed, progress)
        calib = tokens[:-n_held]
        return CalibrationRows(calib, tokens[-n_held:], "sampled from the source", calib[:, SAMPLE_PREFIX:].flatten(),
                               lead)
    n_chat = max(1, round(CHAT_SHARE * n / opts.seq_len))
    held_chat = max(1, round(CHAT_SHARE * n_held))
    free = sample_tokens(source.model, source.tokenizer, n - n_chat * opts.seq_len, opts.seq_len, opts.seed, progress)
    chats = sample_chats(source.model, source.tokenizer, n_chat * opts.seq_len, opts.seq_len, opts.seed,
                         lambda d, t: opts.progress("sampling calibration chats", d, t), batch=8)
    calib, held = _mix(free, chats, n_held - held_chat, held_chat)
    stream = torch.cat([free[: len(free) - n_held + held_chat, SAMPLE_PREFIX:].flatten(),
                        chats[: len(chats) - held_chat].flatten()])
    return CalibrationRows(calib, held, "sampled from the source (free text and chats in its template)", stream, lead)


def _data_rows(calib: torch.Tensor, held: torch.Tensor, origin: str) -> CalibrationRows:
    """Rows of --data: their running text is the rows end to end, and they start with nothing added."""
    return CalibrationRows(calib, held, origin, calib.flatten(), [])


def _mix(text: torch.Tensor, chats: torch.Tensor, held_text: int, held_chat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out) rows: each kind's last rows held out (held_text of the text, held_chat of the chats)."""
    cut_text, cut_chat = len(text) - held_text, len(chats) - held_chat
    return torch.cat([text[:cut_text], chats[:cut_chat]]), torch.cat([text[cut_text:], chats[cut_chat:]])


def convert(src: str | Path, out: str | Path, opts: ConvertOptions) -> dict:
    """Run a conversion end to end; returns the record also written to OUT/conversion.json."""
    check_options(opts)
    job = Conversion.start(src, out, opts)
    job.load_source()
    model, summary = job.build(own=False)
    return job.export(model, summary)


@dataclass
class Conversion:
    """One conversion, stage by stage: `start` (refuse what can be refused before loading weights), `load_source`,
    `build` (the identity or a compressed model), `export` (the logit check against the source, then OUT written
    atomically). Call `check_options` before `start`."""

    ref: SourceRef
    out: Path
    opts: ConvertOptions
    source: Source | None = None
    timings: dict = field(default_factory=dict)  # seconds per stage: the record's timings_s
    started: float = 0.0  # perf_counter when loading began: timings_s["total"] counts from here

    @classmethod
    def start(cls, src: str | Path, out: str | Path, opts: ConvertOptions, plan_checks: bool = True) -> Conversion:
        """Check OUT, the data files and the source; `plan_checks=False` skips what only matters when this
        conversion builds the model (a resumed distillation brings its own)."""
        out = Path(out)
        check_output(out, opts.force)
        if opts.data:
            read_data_files(opts.data)  # refuse empty/binary files before loading anything
        ref = resolve(src)
        if plan_checks and not opts.identity:
            check_source_for_plans(ref, opts)  # before a checkpoint folder is prepared or weights are read
        return cls(ref, out, opts)

    def load_source(self) -> Source:
        """The source model in float32 (the reference of the logit check, and the teacher of a distillation)."""
        self.started = time.perf_counter()
        self.opts.log(f"loading {self.ref.name}")
        self.source = load_source(self.ref, dtype=torch.float32)
        self.timings["load"] = round(time.perf_counter() - self.started, 3)
        return self.source

    def build(self, own: bool = True):
        """(model, summary): the CLLA model for the plan and its part of the conversion record. `own=False` leaves the
        model sharing the source's tensors outside attention (no second copy of the weights: what an export needs);
        a model to be trained must own them (identity.own_weights), or its training would change the teacher."""
        if self.opts.identity:
            self.opts.log("building the identity CLLA model")
            t = time.perf_counter()
            model = build_identity(self.source.model, self.source.model_type, self.ref.name)
            self.timings["build"] = round(time.perf_counter() - t, 3)
            summary = {"plan": "identity"}
        else:
            model, summary = compress(self.source, self.ref.name, self.opts, self.timings)
        if own:
            own_weights(model, self.source.model)
        return model, self.stamp(summary)

    def stamp(self, summary: dict) -> dict:
        """The summary with the source's model type and the timings (the same dict: later stages add to it)."""
        return summary | {"source_model_type": self.source.model_type, "timings_s": self.timings}

    def export(self, model, summary: dict) -> dict:
        """Check the model's logits against the source, then write OUT atomically; returns the conversion record."""
        opts, source = self.opts, self.source
        ids = check_tokens(source.tokenizer, model.config.vocab_size, opts.check_tokens)
        err = max_relative_logit_error(source.model, model, ids)
        opts.log(f"max relative logit error vs source on {ids.shape[1]} tokens: {err:.2e}")
        dtype = resolve_dtype(opts.dtype, source)
        summary |= {
            "dtype": str(dtype).removeprefix("torch."),
            "check": {"tokens": int(ids.shape[1]), "max_relative_logit_error_fp32": err},
        }
        t = time.perf_counter()
        with atomic_folder(self.out, opts.force) as tmp:
            opts.log(f"writing {self.out}")
            write_model(tmp, model, source.tokenizer, source.model.generation_config, dtype)
            self.timings["export"] = round(time.perf_counter() - t, 3)
            self.timings["total"] = round(time.perf_counter() - self.started, 3)
            record = conversion_record(model.config, summary)
            write_conversion_json(tmp, record)
        return record


def check_source_for_plans(ref, opts: ConvertOptions) -> None:
    """Refuse, from the source's config alone, what no compressed plan (or the --target) can do with it."""
    from .identity import identity_config

    model_type = model_type_of(ref)
    if opts.overrides.target not in (None, "clla"):
        fit_target(identity_config(load_source_config(ref), model_type, ref.name), opts.overrides)


def long_calibration(source, stream: torch.Tensor, lead: list[int], opts: ConvertOptions) -> torch.Tensor | None:
    """opts.long_rows rows of min(long_len, the model's positions) tokens packed from the calibration text with recall
    and task rows (calibrate.long_calibration_rows), calibrated on beside the short rows; None when the model's
    positions or the calibration text leave no room for rows longer than the short ones."""
    length = row_length(source, opts.long_len)
    if not opts.long_rows or length <= opts.seq_len or stream.numel() < 2 * opts.seq_len:
        return None
    return long_calibration_rows(stream, opts.long_rows, length, opts.seq_len, opts.seed, source.tokenizer, lead)[0]


def plan_context(base, context: int | None) -> int:
    """The row length a --kv-ratio is planned at: `context`, within the model's positions, else the positions,
    capped (config.default_plan_context). Without sliding-window layers the ratio is the same at every length."""
    longest = base.max_position_embeddings
    if context is not None and context > longest:
        raise KvconvertError(f"--context {context:,} exceeds the model's max_position_embeddings ({longest:,})")
    return context or default_plan_context(base)


def compress(source, name: str, opts: ConvertOptions, timings: dict):
    """Calibrate, plan and build a compressed model; returns it and its part of the conversion record."""
    from .identity import identity_config

    base = identity_config(source.model.config, source.model_type, name)
    ov = fit_target(base, check_overrides_against(base, opts))
    context = plan_context(base, opts.context)
    device = next(source.model.parameters()).device
    fast = judge_dtype(opts.judge_dtype, device)  # sampling and judging only: the statistics stay float32
    t = time.perf_counter()
    with forwards_in(fast, device):
        calib, heldout, origin, stream, lead = calibration_tokens(source, opts)
    long = long_calibration(source, stream, lead, opts)
    cal = collect_inputs(source.model, calib, progress=lambda d, n: opts.progress("calibrating", d, n), long=long,
                         received=opts.attention_weight > 0)
    timings["calibrate"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    comp = Compressor(source.model, source.model_type, name, cal, opts.attention_weight)
    probe = recall_probe(source, stream, lead, opts)
    report = choose_plan(comp, opts.kv_ratio, ov, heldout, log=opts.log, probe=probe, sequential=opts.refit,
                         top_up=opts.top_up, context=context, dtype=fast)
    timings["plan_and_build"] = round(time.perf_counter() - t, 3)
    model, plan = report.model, report.plan
    if ov.target == "deepseek-v3":
        from .deepseek import deepseek_v3_reasons

        reasons = deepseek_v3_reasons(model.config)
        if reasons:  # fit_target should have made this impossible
            raise KvconvertError(f"internal: the deepseek-v3 plan does not fit the format: {'; '.join(reasons)}")
    per_group = [
        {"layers": list(g), "latent": plan.group_segments(i),
         "proxy_error": proxy_error(comp, replace(plan, groups=(g,), widths=plan.widths and (plan.widths[i],)))}
        for i, g in enumerate(plan.groups)
    ]
    summary = {
        "plan": plan.describe(),
        "target_kv_ratio": opts.kv_ratio,
        "context": context,
        "calibration": {"tokens": int(calib.numel()), "heldout_tokens": int(heldout.numel()), "origin": origin,
                        "long_rows": 0 if long is None else len(long),
                        "long_len": 0 if long is None else long.shape[1],
                        "attention_weight": opts.attention_weight},
        "judge_dtype": str(fast).removeprefix("torch."),
        "heldout_kl": report.heldout_kl,
        "recall_kl": report.recall_kl,
        "recall_probe_tokens": probe.tokens.shape[1] if probe is not None else None,
        "recall_probe_rows": probe.tokens.shape[0] if probe is not None else None,
        "per_group_error": per_group,
        "candidates": report.candidates,
    }
    return model, summary
