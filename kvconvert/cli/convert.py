"""`kvconvert convert`: a source to a CLLA model; with --distill-tokens (or --resume), then a distillation from
the source (kvconvert.distill) before the logit check and the atomic export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import KvconvertError
from .common import is_main_process, log, out, print_json, return_freed_memory, set_threads, step_reporter, task_progress, training_progress_bar, user_errors
from .options import DISTILL, DistillFlags, Threads, force_option, json_option, option_groups
from .render import conversion_tables

ForceOut = force_option("Replace OUT if it exists.")
RecordJson = json_option("Print the conversion record as JSON.")


def parse_group_sizes(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise KvconvertError(f"--groups wants comma-separated group sizes like 1,2,3,3; got {spec!r}") from None


@user_errors
@option_groups(flags=DistillFlags)
def convert(
    src: Annotated[str, typer.Argument(help="Source: a transformers folder (safetensors), a .gguf file, or 'smollm2'.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (written atomically).")],
    kv_ratio: Annotated[
        Optional[float],
        typer.Option("--kv-ratio", help="Target KV cache size as a fraction of the source's 16-bit cache at --context tokens, in (0, 1]."),
    ] = None,
    context: Annotated[
        Optional[int],
        typer.Option("--context", help="Tokens per sequence the --kv-ratio is planned at: sliding-window layers hold only their window there (default: the model's positions, at most 32,768; the same ratio at every length without sliding windows)."),
    ] = None,
    identity: Annotated[bool, typer.Option("--identity", help="Exact conversion: full-width latent, no compression.")] = False,
    latent_dim: Annotated[Optional[int], typer.Option(help="Latent width per layer group (overrides the plan).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Layers per group, uniform (overrides the plan).")] = None,
    groups: Annotated[Optional[str], typer.Option(help="Group sizes in layer order, e.g. 1,2,3,3,... (uneven groups).")] = None,
    rope_dim: Annotated[Optional[int], typer.Option(help="RoPE dims kept per rope head (even).")] = None,
    rope_heads: Annotated[Optional[int], typer.Option(help="1: one rope key shared by all heads; K: one per kv head.")] = None,
    kv_bits: Annotated[Optional[int], typer.Option(help="Latent bits: 16, 8, 4 or 2 (at 4 the planner may still store a 2-bit tail: --kv-tail-dim 0 rules it out).")] = None,
    kv_tail_dim: Annotated[
        Optional[int], typer.Option(help="Store the latent's last N (lowest-energy) dims at 2 bits, the rest at --kv-bits; 0: none (default: the planner tries 4-bit latents with tails).")
    ] = None,
    rope_bits: Annotated[Optional[int], typer.Option(help="Rope-key bits: 16, 8, 4 or 2 (cached rope keys).")] = None,
    rope_keys: Annotated[
        Optional[str], typer.Option(help="Where rope keys live: latent (reconstructed from the latent before RoPE at each step: nothing else cached, far lower error at low ratios, more decode compute), cached (rotated keys beside the latent, RoPE pairs selected; cheapest decode), or auto (the planner builds both and picks by held-out error; slower). Default: latent, or cached where --rope-bits, --rope-dim 0 or --target deepseek-v3 need cached keys.")
    ] = None,
    quant_group: Annotated[Optional[int], typer.Option(help="Values per quantization scale/zero-point.")] = None,
    target: Annotated[
        str, typer.Option(help="clla: any plan; deepseek-v3: only plans `kvconvert export --format deepseek-v3` can write (one latent per layer, one shared rope key, a normed 16-bit latent).")
    ] = "clla",
    data: Annotated[
        Optional[list[Path]], typer.Option(help="Calibration text (.txt, or .jsonl with a 'text' field); repeatable. Default: text sampled from the source.")
    ] = None,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens (plus 512 held out to rank plans).")] = 3072,
    calib_long_rows: Annotated[
        int, typer.Option(help="Calibration rows of 4,096 tokens (or the model's positions) beside the short ones, packed from the calibration text with far repeats and retrieval prompts, so that long-range attention is in the statistics; 0: short rows only.")
    ] = 2,
    probe_rows: Annotated[
        int, typer.Option(help="Rows of 2,048 tokens on which the planner judges how well each finalist plan still copies and retrieves from far back (half far repeats, half retrieval prompts); each costs a forward per judged plan; 0: judge on short text only.")
    ] = 4,
    attention_weight: Annotated[
        float, typer.Option(help="How much the latent fit weighs each calibration token by the attention it receives in the source, from 0 (every token alike) to 1 (in proportion); heavily read tokens such as the first one (the attention sink) then count as much as they move the outputs.")
    ] = 0.5,
    refit: Annotated[
        bool, typer.Option("--refit/--no-refit", help="Also refit the chosen plan group by group on the converted model's own inputs (each group's latent undoes what the groups before it lost), kept where the planner's judge finds it better; off by default (docs/results.md). Costs one more forward over the calibration rows and one more judged plan.")
    ] = False,
    top_up: Annotated[
        bool, typer.Option("--top-up/--no-top-up", help="Also spend the bytes the chosen plan leaves (its latent widths step in every layer group at once) on the groups whose measured error falls most, kept where the planner's judge finds it better; off by default (docs/results.md: it kept every needle at 0.25 and lost some at 0.10). Costs a backward pass over the held-out rows and one more judged plan.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the sampled calibration text.")] = 0,
    force: ForceOut = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype on disk: auto (the source's), float32, bfloat16, float16.")] = "auto",
    judge_dtype: Annotated[
        str, typer.Option(help="Precision of the forwards that sample the calibration text (and, with --distill-tokens, the teacher's training text) and judge the plans: auto (bfloat16 where the hardware multiplies it natively: GPUs from Ampere on, CPUs with AVX512-BF16 or AMX; else float32), float32, bfloat16. The statistics, fits and the final logit check stay in float32/float64.")
    ] = "auto",
    threads: Threads = None,
    as_json: RecordJson = False,
    distill_tokens: Annotated[
        Optional[int], typer.Option(help="Then distill from the source on N tokens (--data, or text sampled from it).", rich_help_panel=DISTILL)
    ] = None,
    flags: DistillFlags = DistillFlags(),
):
    """Convert SRC into a CLLA model at OUT whose KV cache is at most --kv-ratio of the source's (model.safetensors,
    config, tokenizer, conversion.json with the plan, errors and timings, and a model card). With --distill-tokens,
    then train it from the source (checkpoints in OUT.distill, resumable with --resume; runs data-parallel under
    torchrun)."""
    from ..convert.pipeline import ConvertOptions, convert as run_convert
    from ..convert.plan import ROPE_KEYS, TARGETS, Overrides
    from ..distill.run import convert_and_distill

    distill = flags.options(distill_tokens, data, seed) if distill_tokens is not None else None
    set_threads(threads)
    return_freed_memory()
    overrides = Overrides(
        latent_dim=latent_dim, group_size=group_size, rope_dim=rope_dim, rope_heads=rope_heads, kv_bits=kv_bits,
        rope_bits=rope_bits, quant_group=quant_group, tail_dim=kv_tail_dim, target=target,
        rope_keys=rope_keys,
    )
    if rope_keys is not None and rope_keys not in ROPE_KEYS:
        raise KvconvertError(f"--rope-keys must be one of {', '.join(ROPE_KEYS)}; got {rope_keys}")
    if target not in TARGETS:
        raise KvconvertError(f"--target must be one of {', '.join(TARGETS)}; got {target}")
    if identity and target != "clla":
        raise KvconvertError("--identity is the exact conversion: it takes no --target")
    with training_progress_bar() as bar:
        opts = ConvertOptions(
            identity=identity, kv_ratio=kv_ratio, context=context, overrides=overrides, group_sizes=parse_group_sizes(groups),
            data=list(data or []), calib_tokens=calib_tokens, long_rows=calib_long_rows, probe_rows=probe_rows,
            attention_weight=attention_weight, refit=refit, top_up=top_up, seed=seed, force=force, dtype=dtype, judge_dtype=judge_dtype, log=log, progress=task_progress(bar),
        )
        if distill is None and not flags.resume:
            record = run_convert(src, out_dir, opts)
        else:  # the distillation chained to the conversion refuses --resume without --distill-tokens
            record = convert_and_distill(src, out_dir, opts, distill, flags.resume, flags.checkpoint_dir,
                                         flags.keep_checkpoints, step_reporter(bar))
    if not is_main_process():
        return
    if as_json:
        print_json(record)
        return
    for table in conversion_tables(record, out_dir):
        out.print(table)
