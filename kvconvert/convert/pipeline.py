"""`kvconvert convert`: load the source, build the CLLA model for the plan, check it, export atomically."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import KvconvertError
from .export import atomic_folder, check_output, conversion_record, write_conversion_json, write_model
from .identity import build_identity
from .source import load_source, resolve

Log = Callable[[str], None]


@dataclass
class ConvertOptions:
    identity: bool = False
    kv_ratio: float | None = None
    force: bool = False
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    check_tokens: int = 64  # tokens of the logit check against the source
    log: Log = field(default=lambda msg: None)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, source_model) -> torch.dtype:
    if name == "auto":
        # A GGUF source is dequantized to float32; a folder keeps the dtype its config declares.
        declared = getattr(source_model.config, "dtype", None) or getattr(source_model.config, "torch_dtype", None)
        return declared if isinstance(declared, torch.dtype) else DTYPES.get(str(declared), torch.float32)
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


def convert(src: str, out: str | Path, opts: ConvertOptions) -> dict:
    """Run a conversion end to end; returns the summary also written to OUT/conversion.json."""
    out = Path(out)
    if opts.kv_ratio is not None and not 0 < opts.kv_ratio <= 1:
        raise KvconvertError(f"--kv-ratio must be in (0, 1], got {opts.kv_ratio}")
    if not opts.identity:
        raise KvconvertError(
            "only --identity conversion exists in this version; compressed plans (--kv-ratio) are not built yet"
        )
    if opts.dtype != "auto" and opts.dtype not in DTYPES:
        raise KvconvertError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {opts.dtype}")
    check_output(out, opts.force)
    ref = resolve(src)
    t0 = time.perf_counter()
    opts.log(f"loading {ref.name}")
    source = load_source(ref, dtype=torch.float32)
    t_load = time.perf_counter() - t0
    opts.log("building the identity CLLA model")
    t1 = time.perf_counter()
    model = build_identity(source.model, source.model_type, ref.name)
    t_build = time.perf_counter() - t1
    ids = check_tokens(source.tokenizer, model.config.vocab_size, opts.check_tokens)
    err = max_relative_logit_error(source.model, model, ids)
    opts.log(f"max relative logit error vs source on {ids.shape[1]} tokens: {err:.2e}")
    dtype = resolve_dtype(opts.dtype, source.model)
    summary = {
        "plan": "identity",
        "source_model_type": source.model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "check": {"tokens": int(ids.shape[1]), "max_relative_logit_error_fp32": err},
        "timings_s": {"load": round(t_load, 3), "build": round(t_build, 3)},
    }
    t2 = time.perf_counter()
    with atomic_folder(out, opts.force) as tmp:
        opts.log(f"writing {out}")
        write_model(tmp, model, source.tokenizer, source.model.generation_config, dtype)
        summary["timings_s"]["export"] = round(time.perf_counter() - t2, 3)
        summary["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        record = conversion_record(model.config, summary)
        write_conversion_json(tmp, record)
    return record
