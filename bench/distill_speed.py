"""Distillation throughput: training tokens/s and model FLOP utilization (MFU), with and without recomputation.

    python -m bench.distill_speed --model OUT --source smollm2                 # GPU: 16,384 tokens a micro-batch
    python -m bench.distill_speed --model OUT --source smollm2 --checkpointing auto,on,off --steps 12
    python -m bench.distill_speed --model OUT --source smollm2 --steps 3      # CPU: a smoke run (minutes)

Trains MODEL against SOURCE (kvconvert.distill.train.train, the loop `kvconvert distill` runs) on random token ids
(throughput does not depend on the values), --steps optimizer steps of --batch-size × --seq-len tokens (0: the
device's defaults), once per --checkpointing mode (auto: what `distill` decides; on; off). Reports the median step
time after --warmup steps, tokens/s, the model FLOPs per token (kvconvert.distill.flops), MFU against the device's
measured matmul rate (bf16 on GPU, fp32 on CPU), and the peak memory (RSS; on GPU torch's peak allocation).
Writes bench/results/distill_speed_<cpu|gpu>.json (or --name).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import argument_parser, peak_memory, write_result


def random_ids(vocab: int, opts, steps: int):
    """TrainingData of seeded random token ids: `steps` micro-batches of `opts`' shapes and one validation sequence
    (throughput does not depend on the values)."""
    import torch

    from kvconvert.distill.data import TrainingData

    g = torch.Generator().manual_seed(0)
    return TrainingData(torch.randint(0, vocab, (opts.batch_size * steps, opts.seq_len), generator=g),
                        torch.randint(0, vocab, (1, opts.seq_len), generator=g), "random token ids")


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--model", required=True, help="a converted folder (the student)")
    ap.add_argument("--source", default="smollm2", help="the teacher")
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--checkpointing", default="auto,on", help="comma-separated: auto, on, off")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    import torch

    from kvconvert.distill import dist
    from kvconvert.distill.flops import distill_flops_per_token
    from kvconvert.distill.train import DistillOptions, resolve_lengths, train
    from kvconvert.loading import load_any, load_clla
    from kvconvert.runtime.profile import matmul_peak

    world = dist.World()
    device = world.device
    cuda = device.startswith("cuda")
    peak = matmul_peak(device, torch.bfloat16 if cuda else torch.float32)
    rows = []
    for mode in args.checkpointing.split(","):
        student, teacher = load_clla(args.model).model, load_any(args.source).model
        positions = getattr(teacher.config, "max_position_embeddings", None)
        base = DistillOptions(tokens=1, seq_len=args.seq_len, batch_size=args.batch_size, device=device,
                              eval_every=10**9, save_every=10**9, val_tokens=1,
                              grad_checkpointing={"auto": None, "on": True, "off": False}[mode])
        opts = resolve_lengths(base, positions, device)
        opts = replace(opts, tokens=args.steps * opts.batch_size * opts.seq_len, val_tokens=opts.seq_len)
        data = random_ids(student.config.vocab_size, opts, args.steps)
        flops = distill_flops_per_token(student, teacher, opts.seq_len)
        stamps = []
        with tempfile.TemporaryDirectory() as tmp, peak_memory(device) as memory:
            result = train(student, teacher, data, opts, Path(tmp), world, args.source,
                           progress=lambda s, n, m: stamps.append(time.perf_counter()),
                           log=lambda m: print("  " + m, flush=True))
        steps = [b - a for a, b in zip(stamps, stamps[1:])][max(0, args.warmup - 1):]
        step_s = statistics.median(steps) if steps else result.seconds / max(1, result.steps)
        tokens = opts.batch_size * opts.seq_len
        row = {"checkpointing": mode, "grad_checkpointing": result.grad_checkpointing, "seq_len": opts.seq_len,
               "batch_size": opts.batch_size, "steps": result.steps, "step_s": round(step_s, 4),
               "tokens_per_s": round(tokens / step_s, 1), "model_flops_per_token": flops,
               "mfu": round(tokens / step_s * flops / peak, 4), "memory": memory}
        rows.append(row)
        print(f"{mode:>4} (recomputed: {result.grad_checkpointing}): {row['tokens_per_s']:,.0f} tok/s, "
              f"MFU {row['mfu']:.1%}, step {step_s:.3f} s, {memory}", flush=True)
        del student, teacher
        if cuda:
            torch.cuda.empty_cache()
    name = args.name or f"distill_speed_{'gpu' if cuda else 'cpu'}"
    path = write_result(name, {"model": args.model, "source": args.source,
                               "matmul_tflop_per_s": round(peak / 1e12, 2), "rows": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
