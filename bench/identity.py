"""Identity conversion of SmolLM2-135M-Instruct: logit error, conversion time, perplexity source vs identity.

    python -m bench.identity [--text FILE] [--max-tokens 20480] [--window 512]

Perplexity protocol: kvconvert.evaluate (no BOS, non-overlapping windows, window-1 predictions each), fp32, CPU.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import argument_parser, data_file, write_result


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--text", default=None, help="default: ../shared/data/austen_persuasion.txt")
    ap.add_argument("--max-tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    text_path = data_file("austen_persuasion.txt", args.text)

    from kvconvert.convert.pipeline import ConvertOptions, convert
    from kvconvert.evaluate import read_text, score_windows, text_windows
    from kvconvert.loading import load_clla, load_any

    tmp = Path(tempfile.mkdtemp())
    try:
        out = tmp / "smollm2-identity"
        t0 = time.perf_counter()
        record = convert("smollm2", out, ConvertOptions(identity=True))
        wall = time.perf_counter() - t0
        source = load_any("smollm2")
        model = load_clla(out).model
        windows = text_windows(source.tokenizer, read_text(text_path), args.window, args.max_tokens)
        with torch.no_grad():
            ids = windows[:2]
            a, b = source.model(ids).logits, model(ids).logits
            logit_err = ((a - b).abs().max() / a.abs().max()).item()
        t1 = time.perf_counter()
        src_eval = score_windows(source.model, windows)
        t_src = time.perf_counter() - t1
        t1 = time.perf_counter()
        id_eval = score_windows(model, windows, reference=source.model)
        t_id = time.perf_counter() - t1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "text": text_path.name,
        "max_tokens": args.max_tokens,
        "window": args.window,
        "conversion_wall_s": round(wall, 2),
        "conversion_timings_s": record["timings_s"],
        "check_max_relative_logit_error_fp32": record["check"]["max_relative_logit_error_fp32"],
        "max_relative_logit_error_fp32_after_reload": logit_err,
        "source": src_eval | {"eval_s": round(t_src, 1)},
        "identity": id_eval | {"eval_s": round(t_id, 1)},
    }
    path = write_result("identity_smollm2", result)
    print(f"conversion {wall:.1f} s; max rel logit error {logit_err:.2e} (after reload)")
    print(f"perplexity: source {src_eval['perplexity']:.4f}, identity {id_eval['perplexity']:.4f} "
          f"(top-1 agreement {id_eval['top1_agreement']:.4%}, KL {id_eval['kl']:.2e})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
