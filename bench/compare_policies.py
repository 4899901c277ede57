"""Paired comparison of cache policies and presses over the same text windows: which differences are more than noise.

    python -m bench.compare_policies bench/results/zsmerge_smollm2_cpu_prompt_only_w12.json \\
        bench/results/kvpress_smollm2_cpu_w12.json --budget 0.05 --against zsmerge

Reads the per-window mean NLL (`window_nll`) of every row of bench/zsmerge.py and bench/kvpress_ref.py results (the
same windows of the same text, when both ran with the same --window, --score-last and --windows), and prints for
each method at --budget: perplexity, × full cache, and against the --against method the mean per-window difference of
log-perplexity with its standard error, and on how many windows it is lower. A difference within about two standard
errors is not a ranking. Rows with per-trial passkey outcomes (`passkey_passed`, bench/zsmerge.py) are compared trial
by trial too: accuracy, the trials only one of the two passes, and the exact McNemar p-value (the statistics:
kvconvert.paired_comparison). Writes bench/results/<--name>.json.
"""

from __future__ import annotations

import sys

from bench.common import argument_parser, write_result
from kvconvert.errors import KvconvertError
from kvconvert.paired_comparison import compare_passkey, compare_perplexity, methods_at_budget


def print_perplexity(n: int, rows: list[dict], against: str) -> None:
    if rows:
        print(f"{n} windows; d = mean per-window log-perplexity minus {against}'s (± standard error)")
    for r in rows:
        print(f"{r['method']:34s} ppl {r['perplexity']:8.3f}  x full {r['vs_full']:.3f}  d {r['d_log_ppl']:+.4f} ± "
              f"{r['se']:.4f}  lower on {r['windows_lower']}/{n}")


def print_passkey(rows: list[dict], against: str) -> None:
    length = None
    for r in rows:  # length by length, as compare_passkey orders them
        if r["length"] != length:
            length = r["length"]
            print(f"passkey {length}: {r['trials']} trials; wins / losses = trials only this method / only {against} "
                  "passes")
        print(f"{r['method']:34s} {r['accuracy']:6.0%}  wins {r['wins']:3d}  losses {r['losses']:3d}  p {r['p']:.3f}")


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("results", nargs="+", help="JSON results with window_nll or passkey_passed per row")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--model", default="source", help="kvconvert rows of this model (kvpress rows: the source)")
    ap.add_argument("--against", default="zsmerge", help="the method every other is compared with")
    ap.add_argument("--name", default="policy_comparison_smollm2_cpu")
    args = ap.parse_args()
    found = methods_at_budget(args.results, args.budget, args.model)
    if "full" not in found:
        sys.exit("error: no full-cache row in the results")
    against = next((m for m in found if m.split(" ", 1)[-1] == args.against), None)
    if against is None:
        sys.exit(f"error: no row of {args.against} at budget {args.budget} (have: {', '.join(found)})")
    print(f"budget {args.budget:g}, against {against}")
    try:
        n, rows = compare_perplexity(found, against)
        print_perplexity(n, rows, against)
        passkey = compare_passkey(found, against)
        print_passkey(passkey, against)
    except KvconvertError as e:
        sys.exit(f"error: {e}")
    if not rows and not passkey:
        sys.exit(f"error: {against} and the full cache share no measurement (window_nll or passkey_passed)")
    result = {"budget": args.budget, "windows": n, "against": against, "inputs": args.results, "rows": rows}
    if passkey:
        result["passkey"] = passkey
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
