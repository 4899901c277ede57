"""Two methods on the long-context suite, paired trial by trial: which of them finds more, and whether that is noise.

    python -m bench.compare_suites bench/results/kvpress_suite_smollm2_cpu.json kvzip@0.25 \\
        bench/results/long_policies_smollm2_cpu.json zsmerge:score=reconstruct@0.25

Each side is a result file of bench/long_policies.py or bench/kvpress_ref.py --suite and a row of it, METHOD@BUDGET
(`full` for the full cache). Both must have run the same trials (same tasks, lengths, trials and haystack; the files
say which). Prints, per task and length, each side's trials passed, the trials only one passes, and the exact McNemar
p-value, then the same pooled over every task (kvconvert.longcontext.compare_suites).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import argument_parser


def suite_row(path: str, spec: str) -> tuple[dict, list[dict]]:
    data = json.loads(Path(path).read_text())
    method, _, budget = spec.rpartition("@") if "@" in spec else (spec, "", "1.0")
    for row in data["rows"]:
        if row["method"] == method and abs(row["budget"] - float(budget)) < 1e-9:
            return data, row["suite"]
    have = ", ".join(f"{r['method']}@{r['budget']:g}" for r in data["rows"])
    sys.exit(f"error: {path} has no row {spec!r} (has: {have})")


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("a_file")
    ap.add_argument("a_row", help="METHOD@BUDGET")
    ap.add_argument("b_file")
    ap.add_argument("b_row", help="METHOD@BUDGET (the reference of the pairing)")
    args = ap.parse_args()

    from kvconvert.longcontext import compare_suites
    from kvconvert.paired_comparison import mcnemar

    (da, a), (db, b) = suite_row(args.a_file, args.a_row), suite_row(args.b_file, args.b_row)
    for key in ("tasks", "lengths", "trials", "haystack"):
        if da.get(key) != db.get(key):
            sys.exit(f"error: the two files ran different trials ({key}: {da.get(key)} vs {db.get(key)})")
    paired = compare_suites(a, b)
    wins = losses = 0
    for r, ref in zip(paired, b):
        print(f"{r['task']}@{r['length']}: {args.a_row} {sum(r['passed'])}/{r['trials']}, {args.b_row} "
              f"{sum(ref['passed'])}/{ref['trials']}  (only {args.a_row}: {r['wins']}, only {args.b_row}: "
              f"{r['losses']}, p {r['p']:.3f})")
        wins, losses = wins + r["wins"], losses + r["losses"]
    total_a, total_b = sum(sum(r["passed"]) for r in a), sum(sum(r["passed"]) for r in b)
    print(f"pooled: {args.a_row} {total_a}, {args.b_row} {total_b}; only {args.a_row} {wins}, only {args.b_row} "
          f"{losses}; p {mcnemar(wins, losses):.3f}")


if __name__ == "__main__":
    main()
