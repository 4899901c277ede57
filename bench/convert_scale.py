"""Conversion at the sizes users bring: peak memory and time of `kvconvert convert` on random-weight models of real
architectures.

    python -m bench.convert_scale --arch qwen2-0.5b,llama-1b            # peak RSS and time, per stage
    python -m bench.convert_scale --source smollm2 --ratio 0.1,0.25 --judge-dtype float32,bfloat16 \
        --name convert_time_smollm2_cpu                                   # a real checkpoint: time, plan, KLs

With --source, a real checkpoint instead (SmolLM2 by name): the same figures, and the plan's held-out and
recall KLs, for each --ratio and --judge-dtype.

Each architecture's folder is made once (bfloat16 safetensors with seeded random weights, config only, no tokenizer;
`--folder-root`), then `kvconvert convert FOLDER OUT --kv-ratio R` runs as its own process. Its peak resident memory
(the kernel's high-water mark, VmHWM, read as it exits) is set against the model's weights in float32, the
dtype the conversion holds the source in; a sampler reads the child's RSS every 0.2 s and splits the curve by the
stage the conversion last logged. Memory and time depend on the shapes and the plan search, not on the weights'
values, so these numbers stand for the real checkpoints of the same shapes; quality numbers from such folders mean
nothing and are not reported. The shapes are the published configs of each checkpoint (Qwen2.5-0.5B, Llama 3.2 1B,
Gemma 3 270M, Llama 3.1 8B).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import argument_parser, write_result

ARCHS = {
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                                 rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "gemma3-270m": ("gemma3_text", dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                        max_position_embeddings=32768, query_pre_attn_scalar=256, sliding_window=512,
                                        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
                                        rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                               "rope_theta": 10000.0},
                                                         "full_attention": {"rope_type": "default",
                                                                            "rope_theta": 1000000.0}},
                                        tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "llama-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                               rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "llama-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                               rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
}


def make_folder(arch: str, folder: Path, seed: int = 0) -> int:
    """The architecture's folder with seeded random bfloat16 weights, made once (in a child process, so that its
    memory is not this process's); returns its parameter count."""
    count = folder / "parameters.txt"
    if not count.is_file():
        code = ("import sys, json, torch; from transformers import AutoConfig, AutoModelForCausalLM; "
                "kind, kw, out, seed = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]); "
                "torch.manual_seed(seed); "
                "m = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw), dtype=torch.bfloat16); "
                "m.save_pretrained(out); open(out + '/parameters.txt', 'w').write(str(sum(p.numel() for p in m.parameters())))")
        kind, kw = ARCHS[arch]
        subprocess.run([sys.executable, "-c", code, kind, json.dumps(kw), str(folder), str(seed)], check=True)
    return int(count.read_text())


def source_parameters(src: str) -> int:
    """The parameter count of a real source (read from its config, no weights loaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvconvert.convert.source import load_source_config, resolve

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_source_config(resolve(src)))
    return sum(p.numel() for p in model.parameters())


class RssSampler(threading.Thread):
    """Samples a process's resident memory (VmRSS) every `every` seconds; `stage` names what it is doing."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.stage = pid, every, "starting"
        self.peaks: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            kb = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("VmRSS:")), 0)
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), kb / 2**20)
            time.sleep(self.every)


def stage_of(line: str) -> str | None:
    """The stage a line of `kvconvert convert`'s log opens, if any (sampling and calibrating draw progress bars, no
    log lines: they count to the load's stage)."""
    for needle, stage in (("loading", "load_and_calibrate"), ("planning:", "plan"), ("max relative logit error", "check"),
                          ("writing", "export")):
        if needle in line:
            return stage
    return None


# Runs kvconvert's CLI with sys.argv[2:], then writes the process's peak RSS (VmHWM, KiB) to the file sys.argv[1].
CHILD = ("import sys; from pathlib import Path; from kvconvert.cli import main; hwm, sys.argv = sys.argv[1], sys.argv[1:]\n"
         "try:\n    main()\nfinally:\n    Path(hwm).write_text(next(l.split()[1] for l in "
         "Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')))")


def run_conversion(folder: Path | str, out: Path, ratio: float, judge: str | None = None) -> dict:
    """`kvconvert convert` as a child process: its peak RSS, wall time, RSS peak per stage and its record."""
    args = ["convert", str(folder), str(out), "--kv-ratio", str(ratio)] + (["--judge-dtype", judge] if judge else [])
    hwm = out.parent / "vmhwm.txt"
    cmd = [sys.executable, "-c", CHILD, str(hwm), *args]
    env = os.environ | {"COLUMNS": "200", "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = RssSampler(proc.pid)
    sampler.start()
    log = []
    for line in proc.stdout:
        log.append(line.rstrip())
        sampler.stage = stage_of(line) or sampler.stage
    proc.wait()
    wall = time.perf_counter() - t
    sampler.done.set()
    if proc.returncode:
        sys.exit("conversion failed:\n" + "\n".join(log[-20:]))
    peak_gib = int(hwm.read_text()) / 2**20  # the kernel's high-water mark of the child's RSS, KiB
    record = json.loads((out / "conversion.json").read_text())
    return {"command": " ".join(["kvconvert", *args]), "wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 3),
            "rss_peak_by_stage_gib": {k: round(v, 3) for k, v in sampler.peaks.items()},
            "timings_s": record.get("timings_s"), "plan": record.get("plan"), "kv_ratio": record.get("kv_ratio"),
            "candidates": len(record.get("candidates", [])), "judge_dtype": record.get("judge_dtype"),
            "heldout_kl": record.get("heldout_kl"), "recall_kl": record.get("recall_kl"),
            # plans the recall probe scored on every row, and those it stopped (plan.RecallProbe.kl_bound)
            "recall_scored": sum(c.get("recall_kl") is not None for c in record.get("candidates", [])),
            "recall_stopped": sum("recall_kl_at_least" in c for c in record.get("candidates", []))}


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--arch", default="qwen2-0.5b,llama-1b", help=f"comma-separated, of {', '.join(ARCHS)}")
    ap.add_argument("--source", default=None,
                    help="a real source in place of --arch (a folder, a .gguf or 'smollm2'): its plans' KLs mean something")
    ap.add_argument("--ratio", default="0.25", help="comma-separated KV ratios")
    ap.add_argument("--judge-dtype", default="auto", help="comma-separated --judge-dtype values, each a conversion")
    ap.add_argument("--folder-root", type=Path, default=Path(tempfile.gettempdir()) / "kvconvert-bench-models")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    rows = []
    if args.source and args.arch != ap.get_default("arch"):
        sys.exit("error: --source replaces --arch: give one")
    for arch in [args.source] if args.source else args.arch.split(","):
        if not args.source and arch not in ARCHS:
            sys.exit(f"error: unknown --arch {arch} (one of {', '.join(ARCHS)})")
        if args.source:
            folder, n = args.source, source_parameters(args.source)
        else:
            folder = args.folder_root / arch
            n = make_folder(arch, folder)
        for ratio in (float(r) for r in args.ratio.split(",")):
            for judge in args.judge_dtype.split(","):
                out = Path(tempfile.mkdtemp(prefix="convert-"))
                try:
                    row = {"arch": arch, "parameters": n, "weights_fp32_gib": round(4 * n / 2**30, 3), "ratio": ratio,
                           **run_conversion(folder, out / "out", ratio, judge)}
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                row["peak_over_fp32_weights"] = round(row["peak_rss_gib"] / row["weights_fp32_gib"], 3)
                print(json.dumps(row), flush=True)
                rows.append(row)
    default = f"convert_time_{Path(args.source).stem}_cpu" if args.source else "convert_scale_cpu"
    path = write_result(args.name or default, {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
