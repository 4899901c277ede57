"""What ZSMerge's residual merge does to each layer's attention output, one layer at a time (no error propagation).

    python -m bench.studies.merge_error [--text FILE] [--windows 2] [--budget 0.05]

SmolLM2-135M-Instruct (a Llama source), 4096-token windows of a text (default: Emma, not the benchmarks'
Persuasion): the first 3,072 tokens are the prompt, compressed once to the budget as the runtime's zsmerge policy
does (per layer: the recent half of the budget, heavy hitters by the decayed attention of the prompt's last 512
queries summed over heads, the rest of the prompt evicted); the last 1,024 tokens are the queries judged. For each
layer, on the source's own activations, the relative error ||o - o_full||² / ||o_full||² of the attention output
of the judged queries when the evicted tokens are
  dropped      (H2O)
  merged       into the residual slots as count-weighted averages of keys and values, + log(count) on their
               scores (ZSMerge as the runtime implements it)
  merged, no compensation     the same without + log(count)
  merged by attention          keys and values averaged with the tokens' accumulated attention as weights
and the attention mass that full attention puts on the evicted tokens beside what the merged slots receive.
Writes bench/results/merge_error_smollm2.json.
"""

from __future__ import annotations

import argparse
import math
import time

from bench.common import argument_parser, data_file, write_result


W, CTX = 4096, 3072  # the window and its prompt: the last W - CTX tokens are the judged queries


def parse_args() -> argparse.Namespace:
    ap = argument_parser(__doc__)
    ap.add_argument("--text", default=None, help="default: ../shared/data/austen_emma.txt")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="windows skipped at the start (front matter)")
    ap.add_argument("--budget", type=float, default=0.05)
    return ap.parse_args()


def attention_inputs(model, ids) -> dict:
    """{layer index: the hidden states (W, hidden) its attention reads} for one window `ids` (1, W)."""
    import torch

    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        (lambda i: lambda m, a, k: inputs.__setitem__(i, k["hidden_states"][0].detach()))(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for hk in hooks:
        hk.remove()
    return inputs


def layer_errors(a, x, cos, sin, causal, policy, budget: tuple[int, int, int], heads: tuple[int, int, int]) -> dict:
    """One layer's row: its attention `a` on its inputs x (W, hidden), the prompt compressed to `budget` slots (recent,
    residual, heavy) as the zsmerge policy does, the judged queries' output errors and attention masses
    (module docstring). heads: (H query heads, K kv heads, D head dim)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    recent, residual, heavy = budget
    H, K, D = heads
    judged = torch.arange(CTX, W)
    with torch.no_grad():
        q = a.q_proj(x).view(W, H, D).transpose(0, 1)[None]
        k = a.k_proj(x).view(W, K, D).transpose(0, 1)[None]
        v = a.v_proj(x).view(W, K, D).transpose(0, 1).repeat_interleave(H // K, 0)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q[0], k[0].repeat_interleave(H // K, 0)
        s = (q @ k.transpose(1, 2) * D**-0.5).masked_fill(~causal, -math.inf)
        p = s.softmax(-1)
        last = torch.arange(CTX - policy.prefill_queries, CTX)
        decay = policy.decay ** (CTX - 1 - last).float()
        score = (p[:, last, :CTX] * decay[None, :, None]).sum((0, 1))
        older = torch.arange(CTX - recent)
        keep = torch.zeros(CTX, dtype=torch.bool)
        keep[older[score[older].argsort(descending=True)[:heavy]]] = True
        keep[CTX - recent :] = True
        evicted = (~keep).nonzero()[:, 0]
        runs = torch.tensor_split(evicted, residual)  # position order, as the runtime opens its merge slots
        full = p[:, judged] @ v
        slots = torch.cat([keep.nonzero()[:, 0], judged])
        base_s, base_v = s[:, judged][:, :, slots], v[:, slots]

        def attend(mk=None, mv=None, log_w=None):
            ss, vv = base_s, base_v
            if mk is not None:
                ss = torch.cat([ss, q[:, judged] @ mk.transpose(1, 2) * D**-0.5 + log_w], -1)
                vv = torch.cat([vv, mv], 1)
            pp = ss.softmax(-1)
            err = ((pp @ vv - full).pow(2).sum(-1) / full.pow(2).sum(-1)).mean().item()
            return err, (pp[..., -len(runs):].sum(-1).mean().item() if mk is not None else 0.0)

        def merged(weights):
            mk = torch.stack([(k[:, r] * wr[None, :, None]).sum(1) / wr.sum() for r, wr in zip(runs, weights)], 1)
            mv = torch.stack([(v[:, r] * wr[None, :, None]).sum(1) / wr.sum() for r, wr in zip(runs, weights)], 1)
            return mk, mv

        log_count = torch.tensor([math.log(len(r)) for r in runs])
        mk, mv = merged([torch.ones(len(r)) for r in runs])
        row = {"evicted_mass_full": p[:, judged][:, :, evicted].sum(-1).mean().item()}
        row["dropped"], _ = attend()
        row["merged"], row["merged_slot_mass"] = attend(mk, mv, log_count)
        row["merged_no_compensation"], _ = attend(mk, mv, torch.zeros(len(runs)))
        row["merged_by_attention"], row["merged_by_attention_mass"] = attend(*merged([score[r] for r in runs]), log_count)
    return row


def print_layers(layers: list[dict]) -> None:
    for r in layers:
        print(f"layer {r['layer']:2d}: evicted mass {r['evicted_mass_full']:.3f} (merged slots get {r['merged_slot_mass']:.3f}); "
              f"error dropped {r['dropped']:.4f}, merged x{r['merged'] / r['dropped']:.2f}, "
              f"no compensation x{r['merged_no_compensation'] / r['dropped']:.2f}, "
              f"by attention x{r['merged_by_attention'] / r['dropped']:.2f}")


def main() -> None:
    args = parse_args()

    import torch

    from kvconvert.evaluate import read_text, text_windows
    from kvconvert.loading import load_any
    from kvconvert.runtime.policies import make_policy

    t0 = time.perf_counter()
    source = load_any("smollm2")
    model, cfg = source.model, source.model.config
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    windows = text_windows(source.tokenizer, read_text(data_file("austen_emma.txt", args.text)), W,
                           W * (args.skip + args.windows))[args.skip:]
    policy = make_policy("zsmerge", args.budget, residual=0.02)  # the authors' merge slots (off by default)
    n = policy.slots(W)
    recent, residual = policy.split(n)
    heavy = n - recent - residual
    sums: dict[int, dict[str, float]] = {}
    for w in range(windows.shape[0]):
        inputs = attention_inputs(model, windows[w : w + 1])
        cos, sin = model.model.rotary_emb(inputs[0][None], torch.arange(W)[None])
        causal = torch.ones(W, W).tril().bool()
        for layer_idx, layer in enumerate(model.model.layers):
            row = layer_errors(layer.self_attn, inputs[layer_idx], cos, sin, causal, policy, (recent, residual, heavy),
                               (H, K, D))
            acc = sums.setdefault(layer_idx, {})
            for key, val in row.items():
                acc[key] = acc.get(key, 0.0) + val / windows.shape[0]
        print(f"window {w + 1}/{windows.shape[0]} done", flush=True)
    layers = [{"layer": i, **{key: round(val, 5) for key, val in sums[i].items()}} for i in sorted(sums)]
    print_layers(layers)
    path = write_result("merge_error_smollm2", {
        "text": str(data_file("austen_emma.txt", args.text).name), "windows": windows.shape[0], "window": W,
        "prompt": CTX, "budget": args.budget, "slots": n, "recent": recent, "residual_slots": residual,
        "heavy": heavy, "layers": layers, "wall_s": round(time.perf_counter() - t0, 1),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
