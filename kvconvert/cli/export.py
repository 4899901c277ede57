"""`kvconvert export`: a converted model to another format (DeepSeek-V3, as vLLM and SGLang serve it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import KvconvertError
from .common import log, print_json, user_errors
from .options import force_option, json_option

EXPORT_FORMATS = ("deepseek-v3",)
ForceDest = force_option("Replace DEST if it exists.")
SummaryJson = json_option("Print the export summary as JSON.")


@user_errors
def export(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A converted CLLA folder.")],
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="Output folder (written atomically).")],
    fmt: Annotated[str, typer.Option("--format", help="deepseek-v3: transformers' DeepseekV3ForCausalLM, as vLLM and SGLang serve it.")] = "deepseek-v3",
    force: ForceDest = False,
    as_json: SummaryJson = False,
):
    """Export a converted model to another format. deepseek-v3 takes plans with one latent per layer, one rope key
    shared by all heads, a normed latent and a 16-bit cache (`kvconvert convert --target deepseek-v3` makes them);
    other plans are refused with the reason."""
    if fmt not in EXPORT_FORMATS:
        raise KvconvertError(f"--format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt}")
    from ..convert.deepseek import export_deepseek_v3

    summary = export_deepseek_v3(model_path, dest, force)
    if as_json:
        print_json(summary)
        return
    log(f"wrote {dest}: DeepSeek-V3 ({summary['layers']} layers, kv_lora_rank {summary['kv_lora_rank']}, "
        f"qk_rope_head_dim {summary['qk_rope_head_dim']})")
