"""Peak memory of `kvconvert distill`: the process's resident high-water mark (VmHWM), CPU.

    python -m bench.distill_memory                       # converts SmolLM2 to 0.05 first, then 2 steps of 4,096 tokens
    python -m bench.distill_memory --model OUT --tokens 16384 --seq-len 4096

Runs `kvconvert distill MODEL --teacher smollm2 --data FILE --seq-len L --tokens N` as a child process (validation
at the start and the end: --val-tokens) and reads its peak RSS as it exits. Beside it: the float32 bytes of the
teacher and the student, and what the step itself needs at the least in float32 (both models, the gradients and
AdamW's two moments). Writes bench/results/distill_memory_cpu.json (or --name).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import argument_parser, data_file, write_result
from bench.convert_scale import CHILD


def param_bytes(path: str) -> int:
    from kvconvert.loading import load_any

    model = load_any(path).model
    return sum(p.numel() for p in model.parameters()) * 4  # float32


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--model", default=None, help="a converted folder (default: SmolLM2 converted at --ratio first)")
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--val-tokens", type=int, default=4096)
    ap.add_argument("--data", default=None, help="training text (default ../shared/data/austen_emma.txt)")
    ap.add_argument("--name", default="distill_memory_cpu")
    args = ap.parse_args()
    text = data_file("austen_emma.txt", args.data)
    work = Path(tempfile.mkdtemp(prefix="kvconvert-distill-memory-"))
    model = args.model
    if model is None:
        from kvconvert.convert.pipeline import ConvertOptions, convert

        model = str(work / "student")
        convert("smollm2", Path(model), ConvertOptions(kv_ratio=args.ratio))
    cli = ["distill", model, "--teacher", "smollm2", "--tokens", str(args.tokens), "--data", str(text), "--seq-len",
           str(args.seq_len), "--val-tokens", str(args.val_tokens), "--eval-every", str(10**6), "--out",
           str(work / "out"), "--force"]
    hwm = work / "vmhwm.txt"
    env = os.environ | {"COLUMNS": "200", "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(hwm), *cli], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit("distill failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
    peak = int(hwm.read_text()) * 1024
    teacher, student = param_bytes("smollm2"), param_bytes(model)
    floor = teacher + 4 * student  # both models, the gradients, AdamW's two moments (--train all)
    gib = lambda b: round(b / (1 << 30), 3)  # noqa: E731
    result = {"command": " ".join(["kvconvert", *cli]), "peak_rss_gib": gib(peak), "wall_s": round(wall, 1),
              "teacher_fp32_gib": gib(teacher), "student_fp32_gib": gib(student),
              "models_grads_adam_fp32_gib": gib(floor), "peak_over_that": round(peak / floor, 3),
              "tokens": args.tokens, "seq_len": args.seq_len, "val_tokens": args.val_tokens}
    path = write_result(args.name, result)
    print(f"peak RSS {result['peak_rss_gib']} GiB (models + gradients + AdamW in float32: "
          f"{result['models_grads_adam_fp32_gib']} GiB) in {wall:.0f} s -> {path}")


if __name__ == "__main__":
    main()
