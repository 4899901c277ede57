"""The latent-cache runtime: a static quantized cache per layer group, absorbed decode, token-budget policies, chat.

The names below are imported on first use (PEP 562), so `import kvconvert.runtime.profile` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LatentRuntime": "engine",
    "SamplingOptions": "sampling",
    "GenerationStats": "sampling",
    "sample": "sampling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
