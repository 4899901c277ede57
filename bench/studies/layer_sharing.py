"""What sharing one latent costs, pair by pair of adjacent layers (the measurement behind the planner's prefix layouts).

    python -m bench.studies.layer_sharing [--latent 128] [--calib-tokens 3072]

SmolLM2-135M-Instruct, zero-shot, default sampled calibration: a base plan of one layer per group (latent R @ 4 bit,
rope 1x64 @ 8 bit), then for each adjacent pair (i, i+1) the same plan with only that pair sharing a latent. Reports
held-out KL(source || model) on 512 sampled tokens for each, its increase over the base, and the first-order proxy's
increase (which counts every layer's attention-output error alike). Writes bench/results/layer_sharing_smollm2.json.
"""

from __future__ import annotations

import time
from dataclasses import replace

from bench.common import argument_parser, calibrated, write_result


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--calib-tokens", type=int, default=3072)
    args = ap.parse_args()

    import torch.nn.functional as F

    from kvconvert.convert.plan import Plan
    from kvconvert.convert.plan import kl_to_source, proxy_error
    from kvconvert.loading import load_any

    t0 = time.perf_counter()
    source = load_any("smollm2")
    comp, held = calibrated(source, args.calib_tokens)
    source_logp = F.log_softmax(source.model(held, use_cache=False).logits.float(), -1)
    L = comp.base.num_hidden_layers
    base = Plan(tuple((i,) for i in range(L)), args.latent, 64, 4, 8, 1, 32)
    base_kl = kl_to_source(comp.build(base), held, source_logp)
    print(f"one layer per group, latent {args.latent}: held-out KL {base_kl:.4f}", flush=True)
    rows = []
    for i in range(L - 1):
        groups = tuple((j,) for j in range(i)) + ((i, i + 1),) + tuple((j,) for j in range(i + 2, L))
        kl = kl_to_source(comp.build(replace(base, groups=groups)), held, source_logp)
        proxy = proxy_error(comp, replace(base, groups=((i, i + 1),))) - proxy_error(comp, replace(base, groups=((i,), (i + 1,))))
        rows.append({"pair": [i, i + 1], "heldout_kl": kl, "kl_increase": kl - base_kl, "proxy_increase": proxy})
        print(f"layers {i},{i + 1} share: KL {kl:.4f} ({kl - base_kl:+.4f}), proxy {proxy:+.4g}", flush=True)
    path = write_result("layer_sharing_smollm2", {
        "plan": base.describe(), "calibration_tokens": args.calib_tokens, "heldout_tokens": 512,
        "base_heldout_kl": base_kl, "pairs": rows, "wall_s": round(time.perf_counter() - t0, 1),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
