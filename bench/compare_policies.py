"""Paired comparison of cache policies and presses over the same text windows: which differences are more than noise.

    python -m bench.compare_policies bench/results/zsmerge_smollm2_cpu_prompt_only_w12.json \\
        bench/results/kvpress_smollm2_cpu_w12.json --budget 0.05 --against zsmerge

Reads the per-window mean NLL (`window_nll`) of every row of bench/zsmerge.py and bench/kvpress_ref.py results (the
same windows of the same text, when both ran with the same --window, --score-last and --windows), and prints for
each method at --budget: perplexity, × full cache, and against the --against method the mean per-window difference of
log-perplexity with its standard error, and on how many windows it is lower. A difference within about two standard
errors is not a ranking. Rows with per-trial passkey outcomes (`passkey_passed`, bench/zsmerge.py) are compared trial
by trial too: accuracy, the trials only one of the two passes, and the exact McNemar p-value. Writes
bench/results/<--name>.json.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from bench.common import argument_parser, write_result


def methods(paths: list[str], budget: float, model: str) -> dict[str, dict]:
    """method name -> {"window_nll": per-window mean NLL or None, "passed": {length: per-trial passkey outcomes}},
    the full cache included (one full cache: the first file's that has each measurement)."""
    out: dict[str, dict] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        tool = data.get("tool") or ("kvpress" if "kvpress" in data else "kvconvert")  # head_granularity: reference
        for row in data["rows"]:
            if row.get("model", model) != model:
                continue
            name = row.get("policy") or row.get("press")
            if name != "full" and abs(row["budget"] - budget) > 1e-9:
                continue
            entry = out.setdefault(name if name == "full" else f"{tool} {name}", {"window_nll": None, "passed": {}})
            if entry["window_nll"] is None:
                entry["window_nll"] = row.get("window_nll")
            for length, passed in (row.get("passkey_passed") or {}).items():
                entry["passed"].setdefault(length, passed)
    return out


def mcnemar(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value of `wins` against `losses` discordant trials."""
    n = wins + losses
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n) if n else 1.0


def compare_perplexity(found: dict[str, dict], against: str) -> tuple[int, list[dict]]:
    scored = {name: m["window_nll"] for name, m in found.items() if m["window_nll"] is not None}
    if "full" not in scored or against not in scored:
        return 0, []
    n = len(scored["full"])
    if any(len(v) != n for v in scored.values()):
        sys.exit("error: the results score different numbers of windows")
    full, base, rows = statistics.fmean(scored["full"]), scored[against], []
    print(f"{n} windows; d = mean per-window log-perplexity minus {against}'s (± standard error)")
    for name, nll in sorted(scored.items(), key=lambda kv: statistics.fmean(kv[1])):
        diffs = [a - b for a, b in zip(nll, base)]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
        row = {"method": name, "perplexity": math.exp(statistics.fmean(nll)),
               "vs_full": math.exp(statistics.fmean(nll) - full), "d_log_ppl": mean, "se": se,
               "windows_lower": sum(d < 0 for d in diffs)}
        rows.append(row)
        print(f"{name:34s} ppl {row['perplexity']:8.3f}  x full {row['vs_full']:.3f}  d {mean:+.4f} ± {se:.4f}  "
              f"lower on {row['windows_lower']}/{n}")
    return n, rows


def compare_passkey(found: dict[str, dict], against: str) -> list[dict]:
    """Per length: each method's accuracy, and against `against` the trials only it passes (wins), only the other
    passes (losses) and the exact McNemar p-value. The trials must be the same ones (same seed and count)."""
    rows = []
    for length, base in sorted(found[against]["passed"].items(), key=lambda kv: int(kv[0])):
        print(f"passkey {length}: {len(base)} trials; wins / losses = trials only this method / only {against} passes")
        for name, m in found.items():
            passed = m["passed"].get(length)
            if passed is None:
                continue
            if len(passed) != len(base):
                sys.exit(f"error: {name} ran {len(passed)} passkey trials at {length}, {against} {len(base)}")
            wins = sum(a and not b for a, b in zip(passed, base))
            losses = sum(b and not a for a, b in zip(passed, base))
            row = {"method": name, "length": int(length), "trials": len(passed), "accuracy": sum(passed) / len(passed),
                   "wins": wins, "losses": losses, "p": mcnemar(wins, losses)}
            rows.append(row)
            print(f"{name:34s} {row['accuracy']:6.0%}  wins {wins:3d}  losses {losses:3d}  p {row['p']:.3f}")
    return rows


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("results", nargs="+", help="JSON results with window_nll or passkey_passed per row")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--model", default="source", help="kvconvert rows of this model (kvpress rows: the source)")
    ap.add_argument("--against", default="zsmerge", help="the method every other is compared with")
    ap.add_argument("--name", default="policy_comparison_smollm2_cpu")
    args = ap.parse_args()
    found = methods(args.results, args.budget, args.model)
    if "full" not in found:
        sys.exit("error: no full-cache row in the results")
    against = next((m for m in found if m.split(" ", 1)[-1] == args.against), None)
    if against is None:
        sys.exit(f"error: no row of {args.against} at budget {args.budget} (have: {', '.join(found)})")
    print(f"budget {args.budget:g}, against {against}")
    n, rows = compare_perplexity(found, against)
    passkey = compare_passkey(found, against)
    if not rows and not passkey:
        sys.exit(f"error: {against} and the full cache share no measurement (window_nll or passkey_passed)")
    result = {"budget": args.budget, "windows": n, "against": against, "inputs": args.results, "rows": rows}
    if passkey:
        result["passkey"] = passkey
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
