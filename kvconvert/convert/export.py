"""Atomic export of a converted model: everything is written into a temporary sibling folder, then renamed.

An interrupted run never leaves a half model at OUT; an existing OUT is refused unless `force`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ..config import RING_CHUNK, default_plan_context, kv_bytes, kv_bytes_breakdown, kv_bytes_per_token, source_kv_bytes
from ..errors import KvconvertError


def check_output(out: Path, force: bool) -> None:
    """Refuse OUT before any work starts: it exists (without force), or its parent cannot be written."""
    if out.exists() and not force:
        raise KvconvertError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise KvconvertError(f"{out}: exists and is not a folder")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise KvconvertError(f"{parent}: output's parent folder does not exist")


@contextmanager
def atomic_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; on success it replaces OUT, on any error it is removed."""
    check_output(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if out.exists():
            if not force:
                raise KvconvertError(f"{out}: appeared while converting; not replaced (use --force)")
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


MODEL_CARD = """---
library_name: transformers
tags: [kvconvert, clla, kv-cache-compression]
---
# {name}

Converted by kvconvert {version} from **{source}** into Cross-Layer Latent Attention (CLLA).

| | |
|---|---|
| layer groups | {groups} |
| latent width | {latent} |
| rope dims | {rope_dim} × {rope_heads} rope heads |
| KV bytes per token | {kv} (source: {src_kv}, ratio {ratio}) |

```python
import kvconvert  # registers model_type "clla" with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{name}")
```

`conversion.json` holds the plan, timings and evaluation results.
"""


def conversion_record(cfg, summary: dict) -> dict:
    """What conversion.json holds: versions, KV figures of the plan, and the caller's summary."""
    from .. import __version__

    kv = kv_bytes_per_token(cfg)
    src_kv = cfg.source_kv_bytes_per_token
    context = summary.get("context") or default_plan_context(cfg)
    at_context = {"context": context, "kv_bytes": kv_bytes(cfg, context, RING_CHUNK),
                  "source_kv_bytes": source_kv_bytes(cfg, context)}
    at_context["kv_ratio"] = at_context["kv_bytes"] / at_context["source_kv_bytes"] if src_kv else None
    return {
        "kvconvert_version": __version__,
        "source": cfg.source_name,
        "kv_bytes_per_token": kv,
        "kv_bytes_breakdown": kv_bytes_breakdown(cfg),
        "source_kv_bytes_per_token": src_kv,
        "kv_ratio": kv / src_kv if src_kv else None,
        # one row at `context` tokens, sliding-window groups as the runtime's rings and the source's layers as
        # their windows: the ratio --kv-ratio targets (equal to kv_ratio without sliding windows)
        "at_context": at_context,
        **summary,
    }


def write_conversion_json(folder: Path, record: dict) -> None:
    (folder / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")


def write_model(tmp: Path, model, tokenizer, generation_config, dtype: torch.dtype) -> None:
    """Write weights (safetensors), config, tokenizer, generation config and a model card."""
    from .. import __version__

    cfg = model.config
    model = model.to(dtype)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="2GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if generation_config is not None:
        generation_config.save_pretrained(str(tmp))
    kv = kv_bytes_per_token(cfg)
    src_kv = cfg.source_kv_bytes_per_token
    (tmp / "README.md").write_text(
        MODEL_CARD.format(
            name=tmp.name.split(".tmp-")[0].lstrip("."),
            version=__version__,
            source=cfg.source_name,
            groups=f"{cfg.num_layer_groups} for {cfg.num_hidden_layers} layers",
            latent=cfg.describe_latent().replace(" @ ", " at "),
            rope_dim=cfg.rope_dim,
            rope_heads=cfg.rope_heads,
            kv=kv,
            src_kv=src_kv,
            ratio=f"{kv / src_kv:.4f}" if src_kv else "n/a",
        )
    )
