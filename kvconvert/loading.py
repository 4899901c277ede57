"""Load what a command is pointed at: a converted CLLA folder, or a source checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import CllaConfig
from .convert.source import load_source, read_folder_config, resolve
from .errors import KvconvertError


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any | None
    is_clla: bool
    generation_config: Any | None = None


def is_clla_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and read_folder_config(p).get("model_type") == "clla"


def load_clla(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a converted model folder (safetensors only); refuse anything that is not one."""
    import transformers
    from transformers import AutoTokenizer

    from .model import CllaForCausalLM

    p = Path(path)
    if not p.exists():
        raise KvconvertError(f"{path}: no such folder")
    if not is_clla_folder(p):
        raise KvconvertError(f"{path}: not a kvconvert CLLA model folder (convert it first: kvconvert convert SRC OUT)")
    try:
        CllaConfig.from_pretrained(str(p))
    except ValueError as e:
        raise KvconvertError(f"{path}/config.json: invalid CLLA plan ({e})") from None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = CllaForCausalLM.from_pretrained(str(p), dtype=dtype, use_safetensors=True)
    except Exception as e:
        raise KvconvertError(f"{path}: cannot load the model weights ({e.__class__.__name__}: {str(e)[:200]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception:
        tok = None
    return LoadedModel(p.name, model.eval(), tok, True, model.generation_config)


def load_any(path: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A CLLA folder, or any supported source (folder, .gguf, 'smollm2')."""
    if path != "smollm2" and is_clla_folder(path):
        return load_clla(path, dtype)
    src = load_source(resolve(path), dtype=dtype)
    return LoadedModel(src.ref.name, src.model, src.tokenizer, False, src.model.generation_config)


def load_for_runtime(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """A CLLA model ready for the runtime: a converted folder as it is, a source through an identity conversion
    made in memory (the same runtime then runs both)."""
    from .convert.identity import build_identity

    if path != "smollm2" and is_clla_folder(path):
        loaded = load_clla(path, dtype)
    else:
        src = load_source(resolve(path), dtype=dtype)
        model = build_identity(src.model, src.model_type, src.ref.name)
        model.generation_config = src.model.generation_config
        loaded = LoadedModel(src.ref.name, model, src.tokenizer, False, src.model.generation_config)
    loaded.model.to(device)
    return loaded
