"""kvconvert: convert LLM checkpoints to Cross-Layer Latent Attention (CLLA) and run them.

`import kvconvert` registers the `clla` model type with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(OUT)` loads a converted model.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import CllaConfig, kv_bytes_breakdown, kv_bytes_per_token
from .errors import KvconvertError
from .model import CllaForCausalLM

__version__ = "0.1.0"

AutoConfig.register("clla", CllaConfig, exist_ok=True)
AutoModelForCausalLM.register(CllaConfig, CllaForCausalLM, exist_ok=True)

__all__ = ["CllaConfig", "CllaForCausalLM", "KvconvertError", "kv_bytes_breakdown", "kv_bytes_per_token"]
