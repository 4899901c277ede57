"""Runtime speed: the converted model in kvconvert's latent-cache runtime vs the source in transformers' generate.

    python -m bench.speed --model OUT --source smollm2                         # CPU: batch 1, contexts 128 and 512
    python -m bench.speed --model OUT --source smollm2 --batch 1,16,64 --context 1024,8192 --budget-context 32768

OUT is a converted folder (e.g. `kvconvert convert smollm2 OUT --kv-ratio 0.02`), or a source (it then runs through an
identity conversion: the runtime itself against transformers). One chat turn (greedy,
--chat-tokens new tokens): the runtime's generate, as `kvconvert chat` runs it, against transformers' generate on the
source; and per batch × context point:
prefill tokens/s, decode tokens/s and achieved GB/s (counted bytes: every weight + the cache read per step) of
both, on the same device and dtype (bf16 on CUDA, fp32 on CPU); transformers runs its own `generate` with a static
cache and SDPA. With --budget-context: the largest batch whose KV cache fits --budget-gib at that context, for
both, from the per-token bytes each cache really allocates (measured on a small allocation of each).
Writes bench/results/speed_<cpu|gpu>.json.
"""

from __future__ import annotations


import torch

from bench.common import argument_parser, write_result


def ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x]


def chat_speed(model, source, tok, n: int, rounds: int = 3, cpu_layout: bool = True) -> dict:
    """One chat turn, greedy, n new tokens (no stop token): kvconvert's runtime `generate` (what `kvconvert chat`
    runs) against transformers' `generate` on the source; tokens/s of the whole turn, best of `rounds`."""
    import time

    from kvconvert.runtime.chat import chat_template_ids
    from kvconvert.runtime import LatentRuntime, SamplingOptions

    ids = chat_template_ids(tok, [{"role": "user", "content": "Tell me about the history of Paris."}])
    device = next(model.parameters()).device
    rt = LatentRuntime(model, 1, len(ids) + n + 1, cpu_layout=cpu_layout)
    ours, theirs = [], []
    for _ in range(rounds):
        rt.reset()
        t0 = time.perf_counter()
        out, _ = rt.generate([ids], SamplingOptions(max_new_tokens=n))
        ours.append(len(out[0]) / (time.perf_counter() - t0))
        x = torch.tensor([ids], device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            y = source.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
        theirs.append((y.shape[1] - len(ids)) / (time.perf_counter() - t0))
    return {"prompt_tokens": len(ids), "new_tokens": n, "runtime_tokens_per_s": max(ours),
            "transformers_tokens_per_s": max(theirs), "speedup": max(ours) / max(theirs)}


def main() -> None:
    ap = argument_parser(__doc__)
    ap.add_argument("--model", required=True, help="converted CLLA folder")
    ap.add_argument("--source", required=True, help="its source (folder, .gguf or smollm2)")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--context", default="128,512")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--no-prefill", action="store_true", help="decode only (the cache is filled with random codes)")
    ap.add_argument("--budget-context", type=int, default=0)
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chat-tokens", type=int, default=64, help="new tokens of the chat-turn comparison (0: skip)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="eager decode steps on CUDA")
    ap.add_argument("--row-major", action="store_true",
                    help="CPU: keep the weights row-major (no runtime/layout.py re-layout), to measure what it brings")
    ap.add_argument("--name", default=None, help="result file name (default: speed_cpu or speed_gpu)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kvconvert.loading import load_any, load_for_runtime
    from kvconvert.runtime.profile import (device_roofline, measure_converted_memory, measure_source_memory,
                                           time_converted, time_source)

    cuda = torch.cuda.is_available()
    graphs = cuda and not args.no_cuda_graphs
    name = args.name or "speed_" + ("gpu" if cuda else "cpu")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    loaded = load_for_runtime(args.model, dtype, device)  # a source runs through an identity conversion
    model = loaded.model
    source = load_any(args.source, dtype).model.to(device)
    points: list[dict] = []
    roofline = device_roofline(device, dtype)
    result: dict = {"model": args.model, "source": args.source, "dtype": str(dtype).removeprefix("torch."),
                    "cpu_layout": not cuda and not args.row_major,
                    "cuda_graphs": graphs, "steps": args.steps, "prefill": not args.no_prefill, "roofline": roofline,
                    "points": points}
    # The model's trained context bounds the cache (the runtime refuses more): a longer --context is cut to it.
    longest = model.config.max_position_embeddings - args.steps - 3
    for b in ints(args.batch):
        for c in ints(args.context):
            if c > longest:
                print(f"context {c:,} + {args.steps} steps exceeds the model's {model.config.max_position_embeddings:,} "
                      f"positions: timing {longest:,}")
                c = longest
            rt = time_converted(model, b, c, args.steps, not args.no_prefill, cuda_graphs=graphs,
                                cpu_layout=False if args.row_major else None, roofline=roofline)
            hf = time_source(source, b, c, args.steps, roofline=roofline)
            points.append({"batch": b, "context": c, "runtime": rt, "transformers": hf,
                           "decode_speedup": rt["decode_tokens_per_s"] / hf["decode_tokens_per_s"]})
            print(f"batch {b:3d} context {c:6,d}: runtime {rt['decode_tokens_per_s']:9,.1f} tok/s "
                  f"({rt['achieved_gb_per_s']:7,.1f} GB/s, {rt['share_of_roofline']:.0%} of its {rt['bound']} roofline)  "
                  f"transformers {hf['decode_tokens_per_s']:9,.1f} tok/s ({hf['achieved_gb_per_s']:7,.1f} GB/s, "
                  f"{hf['share_of_roofline']:.0%})  × {points[-1]['decode_speedup']:.2f}", flush=True)
            write_result(name, result)  # after every point: a run cut short keeps what it measured
    if args.chat_tokens:
        result["chat"] = chat_speed(model, source, loaded.tokenizer, args.chat_tokens,
                                    cpu_layout=not cuda and not args.row_major)
        c = result["chat"]
        print(f"chat (one templated turn, {c['new_tokens']} greedy tokens): runtime {c['runtime_tokens_per_s']:.1f} "
              f"tok/s, transformers generate {c['transformers_tokens_per_s']:.1f} tok/s (× {c['speedup']:.2f})")
    if args.budget_context:
        budget = int(args.budget_gib * (1 << 30))
        conv = measure_converted_memory(model, 64, 2)["kv_bytes_per_token_allocated"]
        src = measure_source_memory(source, 64, 2)["kv_bytes_per_token_allocated"]
        result["budget"] = {
            "context": args.budget_context, "gib": args.budget_gib,
            "converted_bytes_per_token": conv, "source_bytes_per_token": src,
            "converted_max_batch": budget // (conv * args.budget_context),
            "source_max_batch": budget // (src * args.budget_context),
        }
        r = result["budget"]
        r["ratio"] = r["converted_max_batch"] / max(r["source_max_batch"], 1)
        print(f"largest batch at {args.budget_context:,} tokens in {args.budget_gib:g} GiB of cache: converted "
              f"{r['converted_max_batch']:,}, source {r['source_max_batch']:,} (× {r['ratio']:.1f})")
    path = write_result(name, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
