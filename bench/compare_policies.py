"""Paired comparison of cache policies and presses over the same text windows: which differences are more than noise.

    python bench/compare_policies.py bench/results/zsmerge_smollm2_cpu_prompt_only_w12.json \\
        bench/results/kvpress_smollm2_cpu_w12.json --budget 0.05 --against zsmerge

Reads the per-window mean NLL (`window_nll`) of every row of bench/zsmerge.py and bench/kvpress_ref.py results (the
same windows of the same text, when both ran with the same --window, --score-last and --windows), and prints for
each method at --budget: perplexity, × full cache, and against the --against method the mean per-window difference of
log-perplexity with its standard error, and on how many windows it is lower. A difference within about two standard
errors is not a ranking. Writes bench/results/<--name>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_result  # noqa: E402


def methods(paths: list[str], budget: float, model: str) -> dict[str, list[float]]:
    """method name -> per-window mean NLL, the full cache included (one full cache: the first file's)."""
    out: dict[str, list[float]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        tool = "kvpress" if "kvpress" in data else "kvconvert"
        for row in data["rows"]:
            if "window_nll" not in row or row.get("model", model) != model:
                continue
            name = row.get("policy") or row.get("press")
            if name == "full":
                out.setdefault("full", row["window_nll"])
                continue
            if abs(row["budget"] - budget) < 1e-9:
                out[f"{tool} {name}"] = row["window_nll"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="JSON results with window_nll per row")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--model", default="source", help="kvconvert rows of this model (kvpress rows: the source)")
    ap.add_argument("--against", default="zsmerge", help="the method every other is compared with")
    ap.add_argument("--name", default="policy_comparison_smollm2_cpu")
    args = ap.parse_args()
    found = methods(args.results, args.budget, args.model)
    if "full" not in found:
        sys.exit("error: no full-cache row with window_nll in the results")
    against = next((m for m in found if m.split(" ", 1)[-1] == args.against), None)
    if against is None:
        sys.exit(f"error: no row of {args.against} at budget {args.budget} (have: {', '.join(found)})")
    n = len(found["full"])
    if any(len(v) != n for v in found.values()):
        sys.exit("error: the results score different numbers of windows")
    full = statistics.fmean(found["full"])
    base = found[against]
    rows = []
    print(f"{n} windows, budget {args.budget:g}; d = mean per-window log-perplexity minus {against}'s (± standard error)")
    for name, nll in sorted(found.items(), key=lambda kv: statistics.fmean(kv[1])):
        diffs = [a - b for a, b in zip(nll, base)]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
        row = {"method": name, "perplexity": math.exp(statistics.fmean(nll)),
               "vs_full": math.exp(statistics.fmean(nll) - full), "d_log_ppl": mean, "se": se,
               "windows_lower": sum(d < 0 for d in diffs)}
        rows.append(row)
        print(f"{name:34s} ppl {row['perplexity']:8.3f}  x full {row['vs_full']:.3f}  d {mean:+.4f} ± {se:.4f}  "
              f"lower on {row['windows_lower']}/{n}")
    print(f"wrote {write_result(args.name, {'budget': args.budget, 'windows': n, 'against': against, 'inputs': args.results, 'rows': rows})}")


if __name__ == "__main__":
    main()
