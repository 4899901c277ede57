"""Give a model folder that holds only its config (and tokenizer) seeded random weights, for speed and memory runs.

    python -m bench.tools.random_weights FOLDER [FOLDER ...]        # writes FOLDER/model.safetensors (bfloat16)
    python -m bench.tools.random_weights --strip SRC DST             # copy a model folder without its weights

Speed and memory depend on the architecture, the plan, the dtype and the shapes, not on the weight values; a
machine that the real weights cannot reach (a lent GPU takes at most 64 MiB per call, SmolLM2's GGUF is 98 MB) can
then still time the real shapes: strip the folders here, rebuild the weights there. A CLLA folder (converted:
config.json with model_type "clla") gets `CllaForCausalLM`'s own initialisation, any other transformers folder
`AutoModelForCausalLM.from_config`'s. Quality numbers from such a folder mean nothing; results say where they came
from (the JSON of every benchmark records the model folder).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from bench.common import argument_parser


def strip(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf", ".pt") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def randomize(folder: Path, seed: int, dtype: torch.dtype) -> int:
    from kvconvert.loading import is_clla_folder

    torch.manual_seed(seed)
    if is_clla_folder(folder):
        from kvconvert.config import CllaConfig
        from kvconvert.model import CllaForCausalLM

        model = CllaForCausalLM(CllaConfig.from_pretrained(str(folder)))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    model.to(dtype).save_pretrained(str(folder), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--strip", action="store_true", help="copy SRC to DST without weight files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    if args.strip:
        if len(args.folders) != 2:
            sys.exit("error: --strip takes SRC DST")
        strip(*args.folders)
        print(f"{args.folders[1]}: config and tokenizer of {args.folders[0]}, no weights")
        return
    for folder in args.folders:
        n = randomize(folder, args.seed, getattr(torch, args.dtype))
        print(f"{folder}: {n / 1e6:.1f}M random parameters ({args.dtype})")


if __name__ == "__main__":
    main()
