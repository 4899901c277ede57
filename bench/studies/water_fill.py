"""Bytes moved between layer groups (convert/plan.py: water_fill), each group's proxy error weighted by a layer
sensitivity, against the planner's uniform latent at the same bytes.

    python -m bench.studies.water_fill [--ratio 0.10] [--name water_fill_smollm2_0.1]

SmolLM2-135M-Instruct, `kvconvert convert`'s calibration and recall probe; the planner's plan at --ratio (chosen as
`convert` chooses it, without the water-filling step), then the water-filled plan under each weighting: none (the
proxy's own units), the output sensitivity (stats.output_sensitivity) measured on the held-out rows, and on the
recall probe's scored tokens. Each judged by the planner's held-out KL and recall KL. Writes
bench/results/NAME.json after every row.
"""

from __future__ import annotations

import time

from bench.common import argument_parser, planned, write_result


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--ratio", type=float, default=0.10)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    name = args.name or f"water_fill_smollm2_{args.ratio:g}"

    import torch.nn.functional as F

    import kvconvert.convert.plan as planning
    from kvconvert.convert.source import load_source, resolve
    from kvconvert.convert.stats import output_sensitivity

    t0 = time.perf_counter()
    source = load_source(resolve("smollm2"))
    run = planned(source, args.ratio)
    base, ov, heldout, comp, probe, report = run.base, run.ov, run.heldout, run.comp, run.probe, run.report
    plan = report.plan
    result = {"ratio": args.ratio, "plan": plan.describe(), "rows": [
        {"weights": "uniform latent (the planner's plan)", "heldout_kl": report.heldout_kl, "recall_kl": report.recall_kl,
         "kv_ratio": report.kv_ratio}]}
    print(f"{plan.describe()}: held-out KL {report.heldout_kl:.4f}, recall KL {report.recall_kl:.4f}", flush=True)
    source_logp = F.log_softmax(source.model(heldout, use_cache=False).logits.float(), -1)
    probe_logp = probe.logp(source.model)
    t = time.perf_counter()
    sens_heldout = output_sensitivity(source.model, heldout)
    t_heldout = time.perf_counter() - t
    t = time.perf_counter()
    sens_probe = output_sensitivity(source.model, probe.tokens, probe.mask)
    t_probe = time.perf_counter() - t
    result |= {"sensitivity_heldout": sens_heldout, "sensitivity_probe": sens_probe,
               "sensitivity_seconds": {"heldout": round(t_heldout, 1), "probe": round(t_probe, 1)}}
    ratio_bytes, plan_bytes = int(args.ratio * base.source_kv_bytes_per_token), planning.plan_bytes(base, plan)
    group_w = lambda sens: [sum(sens[i] for i in g) / len(g) for g in plan.groups]  # noqa: E731
    runs = [("proxy units", None, "the ratio's bytes", ratio_bytes)]
    for label, sens in (("sensitivity, held-out rows", sens_heldout), ("sensitivity, recall probe", sens_probe)):
        runs.append((label, group_w(sens), "the ratio's bytes", ratio_bytes))
        if ratio_bytes - plan_bytes >= 4 * len(plan.groups):  # the plan leaves bytes unspent: also at its own bytes
            runs.append((label, group_w(sens), "the plan's bytes", plan_bytes))
    for label, weights, at, budget in runs:
        filled = planning.water_fill(comp, plan, budget, ov, weights, keep=False)
        if filled is None:
            continue
        model = comp.build(filled)
        kl = planning.kl_to_source(model, heldout, source_logp)
        rkl = probe.kl(model, probe_logp)
        row = {"weights": label, "bytes": at, "plan": filled.describe(), "widths": filled.widths, "heldout_kl": kl,
               "recall_kl": rkl, "kv_ratio": filled.kv_bytes(base) / base.source_kv_bytes_per_token}
        result["rows"].append(row)
        print(f"{label}, {at}: held-out KL {kl:.4f}, recall KL {rkl:.4f}, widths {filled.widths}", flush=True)
        write_result(name, result | {"seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
