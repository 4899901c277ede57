"""Paired comparison of methods (cache policies, presses) measured on the same text windows and passkey trials:
which differences are more than noise.

A result row carries the per-window mean NLL of its method (`window_nll`, as kvconvert.evaluate's
score_windows_with_policy returns it) and/or its per-trial passkey outcomes (`passkey_passed`: {length: [passed per
trial]}, passkey_accuracy's `passed`: the trials depend only on the seed). Against one method, every other gets:
  perplexity  the mean per-window difference d of log-perplexity with its standard error, and on how many windows
              it is lower (a difference within about two standard errors is not a ranking)
  passkey     per length, its accuracy, the trials only it passes (wins), only the other passes (losses), and the
              exact McNemar p-value of wins against losses
`python -m bench.compare_policies` prints these for the benchmarks' result files.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from .errors import KvconvertError


def methods_at_budget(paths: list[str], budget: float, model: str) -> dict[str, dict]:
    """The methods of the result files at `paths` (JSON with "rows"; kvconvert policy rows name a "policy", kvpress
    rows a "press") at `budget` and of `model`: method name ("full", or "<tool> <policy>") -> {"window_nll": per-window
    mean NLL or None, "passed": {length: per-trial passkey outcomes}}. One full cache: the first file's that has each
    measurement."""
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
    """(windows, rows): per method with per-window NLL, lowest perplexity first, its perplexity, × the full cache's,
    and against `against` the mean per-window log-perplexity difference `d_log_ppl` ± `se` and `windows_lower`.
    (0, []) when the full cache or `against` has no per-window NLL."""
    scored = {name: m["window_nll"] for name, m in found.items() if m["window_nll"] is not None}
    if "full" not in scored or against not in scored:
        return 0, []
    n = len(scored["full"])
    if any(len(v) != n for v in scored.values()):
        raise KvconvertError("the results score different numbers of windows")
    full, base, rows = statistics.fmean(scored["full"]), scored[against], []
    for name, nll in sorted(scored.items(), key=lambda kv: statistics.fmean(kv[1])):
        diffs = [a - b for a, b in zip(nll, base)]
        rows.append({"method": name, "perplexity": math.exp(statistics.fmean(nll)),
                     "vs_full": math.exp(statistics.fmean(nll) - full), "d_log_ppl": statistics.fmean(diffs),
                     "se": statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan"),
                     "windows_lower": sum(d < 0 for d in diffs)})
    return n, rows


def compare_passkey(found: dict[str, dict], against: str) -> list[dict]:
    """Per length of `against`'s trials (ascending), per method with that length: its accuracy, and against `against`
    the trials only it passes (wins), only the other passes (losses) and the exact McNemar p-value. The trials must
    be the same ones (same seed and count)."""
    rows = []
    for length, base in sorted(found[against]["passed"].items(), key=lambda kv: int(kv[0])):
        for name, m in found.items():
            passed = m["passed"].get(length)
            if passed is None:
                continue
            if len(passed) != len(base):
                raise KvconvertError(f"{name} ran {len(passed)} passkey trials at {length}, {against} {len(base)}")
            wins = sum(a and not b for a, b in zip(passed, base))
            losses = sum(b and not a for a, b in zip(passed, base))
            rows.append({"method": name, "length": int(length), "trials": len(passed),
                         "accuracy": sum(passed) / len(passed), "wins": wins, "losses": losses,
                         "p": mcnemar(wins, losses)})
    return rows
