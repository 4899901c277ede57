"""`kvconvert profile memory` and `kvconvert profile speed`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import KvconvertError
from .common import err, load_runtime_model, log, out, parse_lengths, print_json, progress_bar, set_threads, user_errors
from .options import AnyModel, AsJson, CudaGraphs, KvBudget, KvPolicy, PolicyOptions, RuntimeDevice, RuntimeDtype, RuntimeModel, RuntimeThreads
from .render import memory_tables, speed_table


@user_errors
def profile_memory(
    model_path: AnyModel,
    context: Annotated[int, typer.Option(help="Tokens per sequence.")] = 32768,
    batch: Annotated[int, typer.Option(help="Sequences.")] = 1,
    budget_gib: Annotated[float, typer.Option(help="Memory for weights + KV cache, GiB.")] = 16.0,
    weight_bytes: Annotated[int, typer.Option(help="Bytes per weight (2 = bf16 serving).")] = 2,
    kv_policy: KvPolicy = None,
    kv_budget: KvBudget = None,
    measure: Annotated[Optional[bool], typer.Option("--measure/--no-measure", help="Also allocate the real caches at --context × --batch and run a decode step (default: on CUDA only).", show_default=False)] = None,
    source: Annotated[Optional[str], typer.Option(help="With --measure on a converted MODEL: its source, measured through transformers beside it.")] = None,
    device: RuntimeDevice = "auto",
    dtype: RuntimeDtype = "auto",
    as_json: AsJson = False,
):
    """KV bytes per token by cached tensor, the source's figure and the ratio, totals at --context × --batch, and the
    largest context or batch that fits --budget-gib. With --measure: the bytes the runtime's cache really allocates
    and (on CUDA) the peak memory of a decode step, beside transformers' static cache on the source."""
    from ..runtime.profile import memory_profile

    if context < 1 or batch < 1 or budget_gib <= 0 or weight_bytes < 1:
        raise KvconvertError("--context, --batch, --budget-gib and --weight-bytes must be positive")
    kv = PolicyOptions(kv_policy, kv_budget)
    kv.check(context)
    cfg, kind = config_of(model_path)
    result = {"model": model_path, "kind": kind} | memory_profile(cfg, context, batch, budget_gib, weight_bytes)
    if kv_policy not in (None, "full"):
        try:
            slots = kv.make().slots(context)
        except ValueError as e:
            raise KvconvertError(str(e)) from None
        per_token = result["kv_bytes_per_token"]["total"]
        result["kv_policy"] = {
            "policy": kv_policy, "budget": kv.budget, "slots_per_sequence": slots,
            "kv_bytes_total": per_token * slots * batch,
            "ratio_to_source_full_cache": per_token * slots / (result["source_kv_bytes_per_token"] * context),
        }
    if measure is None:
        import torch

        measure = torch.cuda.is_available() and device != "cpu"
    if measure:
        result["measured"] = measure_memory(model_path, kind == "converted", source, context, batch, device, dtype)
    if as_json:
        print_json(result)
        return
    for table in memory_tables(result, context, batch, budget_gib, weight_bytes):
        out.print(table)
    if "note" in result.get("measured", {}):
        err.print(f"[dim]{result['measured']['note']}[/]")


def config_of(model_path: str):
    """(CllaConfig, kind): a converted folder's plan, or a source's identity plan."""
    from ..config import CllaConfig
    from ..convert.identity import identity_config
    from ..convert.source import load_source_config, model_type_of, resolve
    from ..loading import is_clla_folder

    if model_path != "smollm2" and is_clla_folder(model_path):
        try:
            return CllaConfig.from_pretrained(model_path), "converted"
        except ValueError as e:
            raise KvconvertError(f"{model_path}/config.json: invalid CLLA plan ({e})") from None
    ref = resolve(model_path)
    return identity_config(load_source_config(ref), model_type_of(ref), ref.name), "source (identity plan)"


def measure_memory(model_path: str, converted: bool, source: str | None, context: int, batch: int, device: str, dtype: str) -> dict:
    """The measured part of `profile memory`: the runtime's cache on MODEL, transformers' static cache on the source."""
    import torch

    from ..loading import load_any, load_for_runtime
    from ..runtime.chat import auto_device, auto_dtype
    from ..runtime.profile import measure_converted_memory, measure_source_memory

    dev = auto_device(device)
    dt = auto_dtype(dtype, dev)
    result: dict = {"device": torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu", "dtype": str(dt).removeprefix("torch.")}
    log(f"measuring {model_path} on {dev}")
    result["converted"] = measure_converted_memory(load_for_runtime(model_path, dt, dev).model, context, batch)
    src = model_path if not converted else source
    if src is not None:
        log(f"measuring the source {src} through transformers")
        result["source"] = measure_source_memory(load_any(src, dt).model.to(dev), context, batch)
    else:
        result["note"] = "give --source SRC to measure the source model beside it"
    if not dev.startswith("cuda"):
        result["note"] = (result.get("note", "") + "; peak memory is measured on CUDA only").lstrip("; ")
    return result


@user_errors
def profile_speed(
    model_path: RuntimeModel,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    context: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "512",
    steps: Annotated[int, typer.Option(help="Decode steps timed per point.")] = 16,
    source: Annotated[Optional[str], typer.Option(help="Time this source model with transformers' generate (static cache, SDPA) beside MODEL; default: MODEL itself when it is a source.")] = None,
    prefill: Annotated[bool, typer.Option("--prefill/--no-prefill", help="Time the prefill of each point (else the cache is filled with random codes, for decode only).")] = True,
    device: RuntimeDevice = "auto",
    dtype: RuntimeDtype = "auto",
    cuda_graphs: CudaGraphs = True,
    threads: RuntimeThreads = None,
    as_json: AsJson = False,
):
    """Prefill and decode tokens/s and achieved GB/s (counted bytes: weights + cache read per decode step) of MODEL in
    the latent-cache runtime over a batch × context grid, beside transformers' own generate on the source."""
    import platform

    import torch
    import transformers

    from .. import __version__
    from ..loading import is_clla_folder, load_any
    from ..runtime.profile import device_roofline, time_converted, time_source

    batches, contexts = parse_lengths(batch, "--batch", 1), parse_lengths(context, "--context", 1)
    if steps < 1:
        raise KvconvertError("--steps must be at least 1")
    set_threads(threads)
    model = load_runtime_model(model_path, device, dtype).model
    dev = next(model.parameters()).device
    longest = max(contexts) + steps + 3
    if longest > model.config.max_position_embeddings:
        raise KvconvertError(f"--context {max(contexts):,} + {steps} steps exceeds the model's max_position_embeddings ({model.config.max_position_embeddings:,})")
    src_path = source if source is not None else (None if (model_path != "smollm2" and is_clla_folder(model_path)) else model_path)
    src_model = None
    if src_path is not None:
        log(f"loading the source {src_path} for transformers' generate")
        src_model = load_any(src_path, model.dtype).model.to(dev)
    points = []
    log("measuring the device's copy bandwidth and matmul rate (the roofline)")
    roofline = device_roofline(dev, model.dtype)
    with progress_bar() as bar:
        task = bar.add_task("profile speed", total=len(batches) * len(contexts))
        for b in batches:
            for c in contexts:
                point: dict = {"batch": b, "context": c}
                point["runtime"] = time_converted(model, b, c, steps, prefill, cuda_graphs and dev.type == "cuda",
                                                  roofline=roofline)
                if src_model is not None:
                    point["transformers"] = time_source(src_model, b, c, steps, roofline=roofline)
                    point["decode_speedup"] = point["runtime"]["decode_tokens_per_s"] / point["transformers"]["decode_tokens_per_s"]
                points.append(point)
                bar.advance(task)
    result = {
        "model": model_path,
        "source": src_path,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(model.dtype).removeprefix("torch."),
        "cuda_graphs": cuda_graphs and dev.type == "cuda",
        "steps": steps,
        "versions": {"kvconvert": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "roofline": roofline,
        "points": points,
    }
    if as_json:
        print_json(result)
        return
    out.print(speed_table(result))
