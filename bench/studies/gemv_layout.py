"""Matrix-vector speed of a Linear weight in its row-major (out, in) layout and input-major (its transpose stored
contiguous), the layouts runtime/layout.py chooses between on CPU.

    python -m bench.studies.gemv_layout                       # SmolLM2-135M's shapes, batch 1 and 4
    python -m bench.studies.gemv_layout --shapes 4096x4096,14336x4096,4096x14336 --rows 1

Each shape is timed over enough distinct weights (--pool-mib) that they stream from memory, as in a decode step
where every layer's weights are read once; GB/s = weight bytes / time. Writes bench/results/gemv_layout_cpu.json.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import argument_parser, write_result


SMOLLM2 = "1536x576,576x1536,576x576,49152x576,96x576"  # gate/up, down, q/o, lm_head, a 2% plan's latent


def time_layout(weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    """Median seconds per product over `repeats` passes of every weight, x (rows, in)."""
    x = torch.randn(rows, weights[0].shape[1])
    for w in weights:
        F.linear(x, w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        times.append((time.perf_counter() - t0) / len(weights))
    return statistics.median(times)


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--shapes", default=SMOLLM2, help="OUTxIN,... weight shapes")
    ap.add_argument("--rows", default="1,4", help="rows of x (the decode batch)")
    ap.add_argument("--pool-mib", type=int, default=256, help="distinct weights per shape, in MiB (beyond the caches)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default="gemv_layout_cpu")
    args = ap.parse_args()
    from kvconvert.runtime.layout import gemv_layout, prefers_input_major

    points = []
    for spec in args.shapes.split(","):
        out, inp = (int(v) for v in spec.split("x"))
        n = max(2, (args.pool_mib << 20) // (out * inp * 4))
        row_major = [torch.randn(out, inp) for _ in range(n)]
        input_major = [w.t().contiguous().t() for w in row_major]
        for rows in (int(r) for r in args.rows.split(",")):
            a, b = time_layout(row_major, rows, args.repeats), time_layout(input_major, rows, args.repeats)
            gb = out * inp * 4 / 1e9
            point = {"out": out, "in": inp, "rows": rows, "row_major_us": a * 1e6, "input_major_us": b * 1e6,
                     "row_major_gb_per_s": gb / a, "input_major_gb_per_s": gb / b, "input_major_speedup": a / b,
                     "runtime_uses": "input-major" if prefers_input_major(row_major[0]) else "row-major"}
            assert (gemv_layout(row_major[0]) is row_major[0]) == (point["runtime_uses"] == "row-major")
            points.append(point)
            print(f"{out:6d} x {inp:6d}, {rows} rows: row-major {a * 1e6:8.1f} us ({gb / a:5.1f} GB/s)  input-major "
                  f"{b * 1e6:8.1f} us ({gb / b:5.1f} GB/s)  x {a / b:.2f}  runtime: {point['runtime_uses']}", flush=True)
        del row_major, input_major
    print(f"wrote {write_result(args.name, {'threads': torch.get_num_threads(), 'points': points})}")


if __name__ == "__main__":
    main()
