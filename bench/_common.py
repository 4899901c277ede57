"""Shared by the benchmark scripts: the environment record every JSON result carries."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def environment() -> dict:
    import torch
    import transformers

    import kvconvert

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvconvert": kvconvert.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    return path


def data_file(name: str, override: str | None) -> Path:
    path = Path(override) if override else DATA / name
    if not path.is_file():
        sys.exit(f"error: {path} not found (pass --text FILE)")
    return path


def calibrated(source, calib_tokens: int = 3072):
    """`kvconvert convert`'s default calibration of SmolLM2 (`source`: load_any("smollm2")): sampled from the model,
    calib_tokens in 256-token sequences plus 512 held out. Returns (Compressor, held-out tokens)."""
    from kvconvert.convert.build import Compressor
    from kvconvert.convert.calibrate import collect_inputs, sample_tokens

    tokens = sample_tokens(source.model, source.tokenizer, calib_tokens + 512, 256)
    return Compressor(source.model, "llama", "smollm2", collect_inputs(source.model, tokens[:-2])), tokens[-2:]
