"""`kvconvert profile memory`, analytic part: KV bytes per token, totals, and what fits a memory budget.

The budget covers weights + KV cache. The source's figures come from the same config (its standard 16-bit
cache, its parameter count), so the two columns compare like for like. Sliding-window layers count what their
caches hold: the runtime's rings (window + one prefill step, `config.cache_slots`), the source's window (as
transformers' sliding-window caches keep).
"""

from __future__ import annotations

from ..config import (RING_CHUNK, CllaConfig, group_and_layer_bytes, kv_bytes, kv_bytes_breakdown, source_kv_bytes,
                      window_tokens)

GIB = 1 << 30


def source_param_count(cfg: CllaConfig) -> int:
    """Parameters of the unconverted source model, from the dims the CLLA config keeps."""
    h, H, K, D, I, V = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    attn = h * H * D + 2 * h * K * D + H * D * h
    if cfg.qkv_bias:
        attn += H * D + 2 * K * D
    if cfg.o_bias:
        attn += h
    if cfg.qk_norm:
        attn += 2 * D  # per-head query and key norm gains
    mlp = 3 * h * I + ((2 * I + h) if cfg.mlp_bias else 0)
    per_layer = attn + mlp + (4 if cfg.sandwich_norms else 2) * h
    return V * h + cfg.num_hidden_layers * per_layer + h + (0 if cfg.tie_word_embeddings else V * h)


def clla_param_count(cfg: CllaConfig) -> int:
    import torch

    from ..model import CllaForCausalLM

    with torch.device("meta"):
        model = CllaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def _fits(budget_bytes: int, weights: int, row_bytes, context: int, batch: int, limit: int) -> dict:
    """row_bytes(n): one row's KV bytes at n tokens (non-decreasing). The longest context up to `limit` (the model's
    positions) whose `batch` rows fit (bisection: windowed layers make it non-linear), and the largest batch at
    `context`."""
    free = budget_bytes - weights
    if free <= 0:
        return {"max_context_at_batch": 0, "max_batch_at_context": 0}
    fits = lambda n: row_bytes(n) * batch <= free  # noqa: E731
    lo, hi = 0, limit
    if fits(limit):
        lo = hi = limit
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"max_context_at_batch": lo, "max_batch_at_context": free // max(1, row_bytes(context))}


def memory_profile(cfg: CllaConfig, context: int, batch: int, budget_gib: float, weight_bytes_per_param: int,
                   ring_chunk: int | None = RING_CHUNK) -> dict:
    """Analytic memory figures of the converted model (its sliding-window groups as the runtime's rings for
    `ring_chunk`) and of its source."""
    breakdown = kv_bytes_breakdown(cfg)
    per_token = sum(breakdown.values())
    src_per_token = cfg.source_kv_bytes_per_token or per_token
    budget = int(budget_gib * GIB)
    weights = clla_param_count(cfg) * weight_bytes_per_param
    src_weights = source_param_count(cfg) * weight_bytes_per_param
    return {
        "context": context,
        "batch": batch,
        "budget_gib": budget_gib,
        "weight_bytes_per_param": weight_bytes_per_param,
        "kv_bytes_per_token": breakdown | {"total": per_token},
        "latent": cfg.describe_latent(),
        "latent_segments": [[{"width": w, "bits": b} for w, b in cfg.group_segments(g)]
                            for g in range(cfg.num_layer_groups)],
        "source_kv_bytes_per_token": src_per_token,
        "kv_ratio": per_token / src_per_token,
        "kv_ratio_at_context": kv_bytes(cfg, context, ring_chunk) / max(1, source_kv_bytes(cfg, context)),
        "converted": {
            "kv_bytes_total": kv_bytes(cfg, context, ring_chunk) * batch,
            "weights_bytes": weights,
            **_fits(budget, weights, lambda n: kv_bytes(cfg, n, ring_chunk), context, batch, cfg.max_position_embeddings),
        },
        "source": {
            "kv_bytes_total": source_kv_bytes(cfg, context) * batch,
            "weights_bytes": src_weights,
            **_fits(budget, src_weights, lambda n: source_kv_bytes(cfg, n), context, batch, cfg.max_position_embeddings),
        },
    }


# ---------------------------------------------------------------------------------------------- measured
# What follows runs models: the runtime's real cache on the converted model, transformers' static cache on the
# source. Allocated bytes are read from the tensors themselves (exact on any device); peaks from the CUDA allocator.


def fill_cache_for_timing(rt, context: int) -> None:
    """Make every row of rt's cache look `context` tokens long, with random finite contents: decode time does not
    depend on the values, and this skips a prefill of batch × context tokens."""
    import torch

    cache = rt.cache
    for g in range(rt.config.num_layer_groups):
        for s in cache.latent_streams(g) + [cache.rope(g)]:
            if s is None:
                continue
            if s.data.dtype == torch.uint8:
                s.data.random_(0, 256)
            else:
                s.data.normal_(0, 0.5)
            if s.scales is not None:
                s.scales[..., 0].uniform_(0.001, 0.01)
                s.scales[..., 1].uniform_(-0.5, 0.5)
    for i in range(rt.config.num_hidden_layers if rt.config.qk_norm else 0):
        cache.key_scale(i).data.uniform_(0.5, 2.0)  # a qk-norm source's key norms
    cache.seq_lens.fill_(context)
    rt.lengths = [context] * cache.batch


def cuda_sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_decode(rt, steps: int, warmup: int = 2) -> float:
    """Seconds per decode step (all rows), from `steps` steps after `warmup` (which also capture the CUDA graph).
    With CUDA graphs the whole range is run once first and undone: a step that crosses into a new filled-length
    bucket captures that bucket's graph, which must not happen inside the timed steps."""
    import time

    import torch

    ids = torch.zeros(rt.cache.batch, dtype=torch.long, device=rt.device)
    start = rt.lengths[0]
    if rt.use_graphs:
        saved = rt.positions.clone(), list(rt.seen), list(rt.written)
        for _ in range(warmup + steps):
            rt.decode(ids)
        rt.cache.seq_lens.fill_(start)
        rt.lengths = [start] * rt.cache.batch
        rt.positions.copy_(saved[0])
        rt.seen, rt.written = saved[1], saved[2]
    for _ in range(warmup):
        rt.decode(ids)
    cuda_sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        rt.decode(ids)
    cuda_sync(rt.device)
    dt = (time.perf_counter() - t0) / steps
    rt.cache.seq_lens.fill_(start)
    rt.lengths = [start] * rt.cache.batch
    return dt


def _median_seconds(fn, device, reps: int) -> float:
    import time

    fn()
    times = []
    for _ in range(reps):
        cuda_sync(device)
        t0 = time.perf_counter()
        fn()
        cuda_sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, gib: float) -> float:
    """GB/s of a large device-to-device copy (bytes read + written): the memory side of the roofline."""
    import torch

    n = int(gib * GIB)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / _median_seconds(lambda: dst.copy_(src), device, 10) / 1e9


def matmul_peak(device, dtype) -> float:
    """FLOP/s of a large square matmul in `dtype`: the compute side of the roofline."""
    import torch

    n = 8192 if torch.device(device).type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / _median_seconds(lambda: a @ b, device, 10)


def device_roofline(device, dtype) -> dict:
    """The measured copy bandwidth and matmul rate a decode step is held against (a few seconds to measure)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    return {"copy_gb_per_s": copy_bandwidth(device, 2.0 if cuda else 0.25),
            "matmul_tflop_per_s": matmul_peak(device, dtype) / 1e12}


def roofline_share(bytes_: float, flops: float, seconds: float, roofline: dict) -> dict:
    """The share of the roofline a time reaches, max(bytes / copy bandwidth, FLOPs / matmul rate) / seconds, and
    which side bounds it."""
    memory, compute = bytes_ / (roofline["copy_gb_per_s"] * 1e9), flops / (roofline["matmul_tflop_per_s"] * 1e12)
    return {"share_of_roofline": max(memory, compute) / seconds, "bound": "compute" if compute > memory else "memory"}


def attention_flops_per_slot(cfg: CllaConfig) -> list[int]:
    """Per layer, the FLOPs of absorbed decode attention per cached slot it reads: scores over the latent (where key
    dims go through it) and the rope keys, values over the latent, and with rope keys from the latent their rebuild
    from the latent (2 R Wr) and rotation."""
    H, Wr = cfg.num_attention_heads, cfg.rope_heads * cfg.rope_dim
    out = []
    for g in cfg.group_of_layer():
        R = cfg.kv_latent_dims[g]
        flops = 2 * H * Wr + 2 * H * R + (2 * H * R if cfg.qk_nope_dim else 0)
        out.append(flops + (2 * R * Wr + 3 * Wr if cfg.rope_from_latent else 0))
    return out


def decode_flops_per_step(model, batch: int, context: int) -> int:
    """FLOPs of one decode step at `context` tokens: two per weight a step reads (weights_read_per_step; the
    embedding is a lookup unless tied to the head) per row, and the attention over the slots each layer reads
    (attention_flops_per_slot; a sliding-window layer its window)."""
    weights = sum(p.numel() for p in weights_read_per_step(model))
    cfg = model.config
    attention = sum(n * f for n, f in zip(window_tokens(cfg, context), attention_flops_per_slot(cfg)))
    return batch * (2 * weights + attention)


def weight_bytes_read_per_step(model) -> int:
    """Bytes of weights a decode step reads (weights_read_per_step)."""
    return sum(p.numel() * p.element_size() for p in weights_read_per_step(model))


def weights_read_per_step(model) -> list:
    """The parameters a decode step reads whole: every parameter once, except an untied input embedding table (a
    decode step reads one row of it per sequence). What the bytes and the FLOPs of a step are counted from."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    return [p for p in model.parameters() if tied or p is not embed]


def measure_converted_memory(model, context: int, batch: int) -> dict:
    """Allocate the runtime's real cache for batch × context and run one decode step at full length."""
    import torch

    from . import LatentRuntime

    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    rt = LatentRuntime.for_context(model, batch, context, cuda_graphs=False)
    result = {"kv_bytes_allocated": rt.cache.nbytes, "kv_bytes_per_token_allocated": rt.cache.bytes_per_token}
    fill_cache_for_timing(rt, context - 1)
    if on_cuda:
        torch.cuda.synchronize()
        result["device_bytes_after_allocation"] = torch.cuda.memory_allocated() - base - rt.extra_weight_bytes()
        torch.cuda.reset_peak_memory_stats()
    rt.decode(torch.zeros(batch, dtype=torch.long, device=device))
    if on_cuda:
        torch.cuda.synchronize()
        # the folded projections the runtime built (a few MiB) are weights, not cache or activations
        result["peak_bytes_during_decode"] = torch.cuda.max_memory_allocated() - base - rt.extra_weight_bytes()
    result["runtime_weight_bytes"] = rt.extra_weight_bytes()
    del rt
    return result


def measure_source_memory(model, context: int, batch: int) -> dict:
    """transformers' StaticCache for batch × context on the source model, and one decode step (the static cache
    is allocated in full and every step attends over all of it, so the position does not change the figures)."""
    import torch
    from transformers import StaticCache

    from ..convert.source import cache_kwargs

    device = next(model.parameters()).device
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    cache = StaticCache(config=model.config, max_cache_len=context)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache), cache_position=torch.tensor([context - 1], device=device), use_cache=True)
    allocated = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
    result = {"kv_bytes_allocated": allocated, "kv_bytes_per_token_allocated": allocated // (batch * context)}
    if on_cuda:
        torch.cuda.synchronize()
        result["peak_bytes_during_decode"] = torch.cuda.max_memory_allocated() - base
    del cache
    return result


def time_converted(model, batch: int, context: int, steps: int, prefill: bool, cuda_graphs: bool, seed: int = 0,
                   cpu_layout: bool | None = None, roofline: dict | None = None) -> dict:
    """Prefill of batch × context random tokens (when `prefill`) and decode steps at that length, in the runtime.
    cpu_layout: LatentRuntime's, which on CPU re-lays out `model`'s weights in place; default: at one row, as
    `kvconvert chat` runs, so that the figure is the one a chat user sees. roofline (device_roofline): adds the
    step's share of it."""
    import time

    import torch

    from . import LatentRuntime

    device = next(model.parameters()).device
    rt = LatentRuntime.for_context(model, batch, context + steps + 3, cuda_graphs=cuda_graphs,
                                   cpu_layout=batch == 1 if cpu_layout is None else cpu_layout)
    result: dict = {}
    if prefill:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
        rt.prefill_chunked(ids, [context] * batch)  # warm-up with the timed shapes (kernel specialisation, autotuning)
        rt.reset()
        cuda_sync(device)
        t0 = time.perf_counter()
        rt.prefill_chunked(ids, [context] * batch)
        cuda_sync(device)
        result["prefill_tokens_per_s"] = batch * context / (time.perf_counter() - t0)
    else:
        fill_cache_for_timing(rt, context)
    dt = time_decode(rt, steps)
    # Every layer reads its group's streams (a group of G layers reads its cache G times per step), a sliding-window
    # layer its window.
    cfg = model.config
    per_group, per_layer = group_and_layer_bytes(cfg)
    per_step = weight_bytes_read_per_step(model) + batch * sum(
        n * (per_group[g] + per_layer) for n, g in zip(window_tokens(cfg, context), cfg.group_of_layer()))
    flops = decode_flops_per_step(model, batch, context)
    return result | {
        "decode_step_ms": dt * 1e3,
        "decode_tokens_per_s": batch / dt,
        "bytes_per_step": per_step,
        "achieved_gb_per_s": per_step / dt / 1e9,
        "flops_per_step": flops,
        "achieved_tflop_per_s": flops / dt / 1e12,
    } | (roofline_share(per_step, flops, dt, roofline) if roofline else {})


def time_source(model, batch: int, context: int, steps: int, seed: int = 0, roofline: dict | None = None) -> dict:
    """transformers' own generate on the source (static cache, SDPA, greedy), one call of 1 + `steps` new tokens,
    each token stamped as generate hands it out (a streamer): prefill = up to the first new token, decode = the
    steps after it. (Decode was once the difference of two generate calls, each with its prefill: at 8k tokens on
    CPU the prefills' jitter outweighed the steps, and two timings of the same model disagreed by 1.6x.)"""
    import time

    import torch
    from transformers.generation.streamers import BaseStreamer

    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)

    class Stamps(BaseStreamer):
        def __init__(self):
            self.at: list[float] = []

        def put(self, value):  # the prompt first, then each new token (every row's) as it is chosen
            cuda_sync(device)
            self.at.append(time.perf_counter())

        def end(self):
            pass

    # disable_compile: on CUDA a static cache would otherwise make transformers torch.compile the step (and
    # recompile for every new cache length, inside the timed region); this compares eager with eager + graphs.
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0, attention_mask=torch.ones_like(ids),
              disable_compile=True, max_new_tokens=1 + steps, min_new_tokens=1 + steps)

    def run() -> tuple[float, float]:
        stamps = Stamps()
        cuda_sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, streamer=stamps, **kw)
        first, last = stamps.at[1], stamps.at[-1]  # at[0]: the prompt, before any work
        return first - t0, (last - first) / (len(stamps.at) - 2)

    run()  # warm-up with the timed shapes
    t1, dt = run()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # transformers caches in the model's dtype (fp32 on CPU): count the bytes it really reads.
    kv = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    per_step = weight_bytes_read_per_step(model) + batch * context * kv
    weights = sum(p.numel() for p in weights_read_per_step(model))
    # two per weight, and per cached token and layer every head's score and value dot products
    flops = batch * (2 * weights + context * cfg.num_hidden_layers * 4 * cfg.num_attention_heads * head_dim)
    return {
        "prefill_tokens_per_s": batch * context / t1,
        "decode_step_ms": dt * 1e3,
        "decode_tokens_per_s": batch / dt,
        "bytes_per_step": per_step,
        "achieved_gb_per_s": per_step / dt / 1e9,
        "flops_per_step": flops,
        "achieved_tflop_per_s": flops / dt / 1e12,
    } | (roofline_share(per_step, flops, dt, roofline) if roofline else {})
