"""What a mixed-precision latent would score at the 0.25 plan's bytes (simulated in the forward: any segments).

The runtime stores a 4-bit head with a 2-bit tail at one quant group (CllaConfig.kv_tail_dim; the planner picks it);
this script also simulates what it cannot store: a quant group per segment, more than two segments, other bits.

    python -m bench.studies.mixed_latent ["192@4/32;96@4/32+160@2/32;..."] [--layout 2x1+14x2 --quant-group 64 --rope-dim 64 --name N]

SmolLM2-135M-Instruct, zero-shot, one layer per group (or --layout), rope 1x64 @ 8 bit (the planner's choice at
--kv-ratio 0.25 and 0.10),
default sampled calibration. The latent is fitted as usual; its dims come in the regression's order (largest
energy first) and are split into segments, each rotated on its own (the same rotation the plan uses) and
quantized at its own bit width and quantization group: R@bits/group+... . The model's forward applies that
quantize->dequantize, so the scores are what such a cache would give. Reports latent bytes per token and layer
group (codes + an fp16 scale and zero per quantization group), held-out KL on 512 sampled tokens, and perplexity,
top-1 agreement and KL on Persuasion (first 20,480 tokens, 512-token windows) as `bench/frontier.py` measures them.
Writes bench/results/mixed_latent_smollm2.json.
"""

from __future__ import annotations

import sys
import time

from bench.common import argument_parser, calibrated, data_file, write_result


DEFAULT = "192@4/32;32@8/32+128@4/32;128@4/32+96@2/32;96@4/32+160@2/32;320@2/32;96@4/32+192@2/64;64@4/32+256@2/64"


def parse(spec: str) -> list[tuple[int, int, int]]:
    out = []
    for part in spec.split("+"):
        width, rest = part.split("@")
        bits, group = rest.split("/")
        out.append((int(width), int(bits), int(group)))
    return out


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("specs", nargs="?", default=DEFAULT, help="';'-separated latent layouts, each R@bits/group[+...]")
    ap.add_argument("--calib-tokens", type=int, default=3072)
    ap.add_argument("--layout", default=None, help="layer groups as runs, e.g. 2x1+14x2 (default: one layer per group)")
    ap.add_argument("--quant-group", type=int, default=32, help="the plan's kv_quant_group (sets the rope keys' group)")
    ap.add_argument("--rope-dim", type=int, default=64, help="the shared rope key's width (8-bit)")
    ap.add_argument("--name", default="mixed_latent_smollm2")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from kvconvert import model as clla
    from kvconvert.convert.plan import Plan
    from kvconvert.convert.latent import rotation
    from kvconvert.convert.plan import kl_to_source
    from kvconvert.evaluate import read_text, score_windows, text_windows
    from kvconvert.loading import load_any
    from kvconvert.quant import fake_quantize

    segments: list[tuple[int, int, int]] = []
    rotations: dict[int, torch.Tensor] = {}

    def forward(self, x, cos, sin):  # CllaLatentProjection.forward with a segmented latent
        c, parts, lo = self.latent(x), [], 0
        for width, bits, group in segments:
            Q = rotations.setdefault(width, rotation(width)).to(c.dtype)
            parts.append(fake_quantize(c[..., lo : lo + width] @ Q.T, bits, group) @ Q)
            lo += width
        k_rope = clla.apply_rope(self.rope_keys(x).transpose(1, 2), cos, sin)
        return torch.cat(parts, -1), fake_quantize(k_rope, self.config.rope_bits, self.config.rope_quant_group)

    t0 = time.perf_counter()
    source = load_any("smollm2")
    windows = text_windows(source.tokenizer, read_text(data_file("austen_persuasion.txt", None)), 512, 20480)
    comp, held = calibrated(source, args.calib_tokens)
    source_logp = F.log_softmax(source.model(held, use_cache=False).logits.float(), -1)
    L = comp.base.num_hidden_layers
    groups: tuple = tuple((i,) for i in range(L))
    if args.layout:
        sizes = [int(k) for part in args.layout.split("+") for n, k in [part.split("x")] for _ in range(int(n))]
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        groups = tuple(tuple(range(a, a + k)) for a, k in zip(starts, sizes))
        if sum(sizes) != L:
            sys.exit(f"error: --layout covers {sum(sizes)} layers, the model has {L}")
    original = clla.CllaLatentProjection.forward
    clla.CllaLatentProjection.forward = forward
    rows = []
    try:
        for spec in args.specs.split(";"):
            segments[:] = parse(spec)
            width = sum(w for w, _, _ in segments)
            latent_bytes = sum(w * b / 8 + w // g * 4 for w, b, g in segments)
            plan = Plan(groups, width, args.rope_dim, 16, 8, 1, args.quant_group, rotate=False)
            model = comp.build(plan)
            kl = kl_to_source(model, held, source_logp)
            r = score_windows(model, windows, reference=source.model)
            rows.append({"latent": spec, "width": width, "latent_bytes_per_group": latent_bytes, "heldout_kl": kl,
                         "perplexity": r["perplexity"], "top1_agreement": r["top1_agreement"], "kl": r["kl"]})
            print(f"{spec:28s} R {width:3d}, {latent_bytes:5.1f} B/group: held-out KL {kl:.4f}, "
                  f"perplexity {r['perplexity']:.2f}, top-1 {r['top1_agreement']:.3f}, KL {r['kl']:.3f}", flush=True)
    finally:
        clla.CllaLatentProjection.forward = original
    path = write_result(args.name, {
        "plan": f"{args.layout or f'{L}x1'} layer groups, rope 1x{args.rope_dim} @ 8 bit (quant group {args.quant_group}), latent as given",
        "calibration_tokens": args.calib_tokens,
        "rows": rows, "wall_s": round(time.perf_counter() - t0, 1),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
