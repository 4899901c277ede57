"""The kvconvert command line (Typer). The only module that prints: results to stdout, progress to stderr."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .distill.train import DistillOptions, Interrupted
from .errors import KvconvertError

app = typer.Typer(
    name="kvconvert",
    help="Shrink the KV cache of an LLM: convert a checkpoint to Cross-Layer Latent Attention, evaluate and profile it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
profile_app = typer.Typer(help="Memory (and, with the runtime, speed) profiles of a model.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")

out = Console()
err = Console(stderr=True)


def user_errors(fn):
    """One clear line and a non-zero exit for every error a user can cause; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KvconvertError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a bug: still one line, with a way to get the traceback
            if os.environ.get("KVCONVERT_DEBUG"):
                raise
            err.print(
                f"[bold red]error:[/] internal error: {e.__class__.__name__}: {e} (set KVCONVERT_DEBUG=1 for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def log(msg: str) -> None:
    if is_main_process():
        err.print(f"[dim]•[/] {msg}", highlight=False)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not is_main_process(),
    )


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def is_main_process() -> bool:
    """False in the processes torchrun starts beside rank 0: they train but print nothing."""
    return int(os.environ.get("RANK", 0)) == 0


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- distill options
DISTILL = "Distillation"
DISTILL_DEFAULTS = DistillOptions(tokens=0)  # the one place the defaults live: both commands read them from here
DistillTokens = Annotated[int, typer.Option(help="Training tokens (all processes together).", rich_help_panel=DISTILL)]
SeqLen = Annotated[int, typer.Option(help="Tokens per training sequence.", rich_help_panel=DISTILL)]
BatchSize = Annotated[int, typer.Option(help="Sequences per micro-batch per process.", rich_help_panel=DISTILL)]
GradAccum = Annotated[int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=DISTILL)]
Lr = Annotated[float, typer.Option(help="Peak AdamW step as a share of each weight tensor's RMS (linear warm-up, cosine decay to 10%).", rich_help_panel=DISTILL)]
Warmup = Annotated[float, typer.Option(help="Share of the steps spent warming up.", rich_help_panel=DISTILL)]
Temperature = Annotated[float, typer.Option(help="Softmax temperature of the KL loss.", rich_help_panel=DISTILL)]
HiddenWeight = Annotated[float, typer.Option(help="Weight of per-layer hidden-state matching (0: logits only).", rich_help_panel=DISTILL)]
TrainSet = Annotated[str, typer.Option("--train", help="What trains: all (default; measured best), attention (the attention blocks), latent (only what the conversion made).", rich_help_panel=DISTILL)]
EvalEvery = Annotated[int, typer.Option(help="Validate (KL, top-1, ppl) every N steps; the best is exported.", rich_help_panel=DISTILL)]
SaveEvery = Annotated[int, typer.Option(help="Checkpoint every N steps (and on Ctrl-C / SIGTERM).", rich_help_panel=DISTILL)]
ValTokens = Annotated[int, typer.Option(help="Held-out validation tokens.", rich_help_panel=DISTILL)]
SampleTokens = Annotated[int, typer.Option(help="Without --data: tokens sampled from the teacher (cycled).", rich_help_panel=DISTILL)]
Device = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda; under torchrun each process takes its local GPU.", rich_help_panel=DISTILL)]
GradCkpt = Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations in backward (default: on GPU only).", rich_help_panel=DISTILL, show_default=False)]
CkptDir = Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default: OUT.distill beside OUT).", rich_help_panel=DISTILL)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run saved in the checkpoint folder.", rich_help_panel=DISTILL)]
Fsdp = Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard student and teacher (FSDP2) instead of replicating them (DDP).", rich_help_panel=DISTILL)]
KeepCkpt = Annotated[bool, typer.Option("--keep-checkpoints", help="Keep the checkpoint folder after export.", rich_help_panel=DISTILL)]


def task_progress(bar: Progress):
    """A `progress(what, done, total)` callback drawing one bar task per `what`."""
    tasks: dict = {}

    def progress(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done)

    return progress


def distill_options(params: dict, tokens: int, data: list[Path] | None) -> DistillOptions:
    """DistillOptions from a command's parameters: every parameter named like a field of it, plus the tokens."""
    names = {f.name for f in dataclasses.fields(DistillOptions)}
    return DistillOptions(**{k: v for k, v in params.items() if k in names} | {"tokens": tokens, "data": list(data or [])})


def step_reporter(bar: Progress):
    task = None

    def report(step: int, steps: int, m: dict) -> None:
        """Loss, throughput and best validation KL in the bar's description; the bar adds elapsed time and ETA."""
        nonlocal task
        text = f"distilling · loss {m['loss']:.4f} · {m['tokens_per_s']:,.0f} tok/s · best val KL {m['best_kl']:.4f}"
        if task is None:
            task = bar.add_task(text, total=steps, completed=step)
        bar.update(task, completed=step, description=text)

    return report


def interrupted_exit(e) -> None:
    """A distillation stopped by a signal: the message says how to resume; exit 128 + signal."""
    err.print(f"[bold yellow]stopped:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(128 + int(e.signum))


def distill_table(d: dict) -> Table:
    t = Table(title="distillation (validation on held-out sequences)")
    for c in ("step", "KL(teacher || student)", "top-1", "perplexity"):
        t.add_column(c, justify="right")
    for row in d["validation"]:
        t.add_row(f"{row['step']:,}", f"{row['val_kl']:.4f}", f"{row['val_top1']:.1%}", f"{row['val_ppl']:.3f}")
    b = d["best"]
    t.caption = (f"best: step {b['step']:,} (exported). {d['tokens']:,} tokens in {d['seconds']:.0f} s on {d['device']};"
                 f" data: {d['data']}")
    return t


# ----------------------------------------------------------------------------------------------- convert
def parse_group_sizes(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise KvconvertError(f"--groups wants comma-separated group sizes like 1,2,3,3; got {spec!r}") from None


@app.command()
@user_errors
def convert(
    src: Annotated[str, typer.Argument(help="Source: a transformers folder (safetensors), a .gguf file, or 'smollm2'.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (written atomically).")],
    kv_ratio: Annotated[
        Optional[float],
        typer.Option("--kv-ratio", help="Target KV cache size as a fraction of the source's 16-bit cache, in (0, 1]."),
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
    seed: Annotated[int, typer.Option(help="Seed of the sampled calibration text.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype on disk: auto (the source's), float32, bfloat16, float16.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the conversion record as JSON.")] = False,
    distill_tokens: Annotated[
        Optional[int], typer.Option(help="Then distill from the source on N tokens (--data, or text sampled from it).", rich_help_panel=DISTILL)
    ] = None,
    seq_len: SeqLen = DISTILL_DEFAULTS.seq_len,
    batch_size: BatchSize = DISTILL_DEFAULTS.batch_size,
    grad_accum: GradAccum = DISTILL_DEFAULTS.grad_accum,
    lr: Lr = DISTILL_DEFAULTS.lr,
    warmup: Warmup = DISTILL_DEFAULTS.warmup,
    temperature: Temperature = DISTILL_DEFAULTS.temperature,
    hidden_weight: HiddenWeight = DISTILL_DEFAULTS.hidden_weight,
    train: TrainSet = DISTILL_DEFAULTS.train,
    eval_every: EvalEvery = DISTILL_DEFAULTS.eval_every,
    save_every: SaveEvery = DISTILL_DEFAULTS.save_every,
    val_tokens: ValTokens = DISTILL_DEFAULTS.val_tokens,
    sample_tokens: SampleTokens = DISTILL_DEFAULTS.sample_tokens,
    device: Device = DISTILL_DEFAULTS.device,
    grad_checkpointing: GradCkpt = DISTILL_DEFAULTS.grad_checkpointing,
    checkpoint_dir: CkptDir = None,
    resume: Resume = False,
    keep_checkpoints: KeepCkpt = False,
    fsdp: Fsdp = False,
):
    """Convert SRC into a CLLA model at OUT whose KV cache is at most --kv-ratio of the source's (model.safetensors,
    config, tokenizer, conversion.json with the plan, errors and timings, and a model card). With --distill-tokens,
    then train it from the source (checkpoints in OUT.distill, resumable with --resume; runs data-parallel under
    torchrun)."""
    from .convert.pipeline import ConvertOptions, convert as run_convert
    from .convert.plan import ROPE_KEYS, TARGETS, Overrides
    from .distill.run import convert_and_distill

    distill = distill_options(locals(), distill_tokens, data) if distill_tokens is not None else None
    set_threads(threads)
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
    with progress_bar() as bar:
        progress = task_progress(bar)
        opts = ConvertOptions(
            identity=identity, kv_ratio=kv_ratio, overrides=overrides, group_sizes=parse_group_sizes(groups),
            data=list(data or []), calib_tokens=calib_tokens, seed=seed, force=force, dtype=dtype, log=log,
            progress=progress,
        )
        try:
            if distill is None and not resume:
                record = run_convert(src, out_dir, opts)
            else:  # the distillation chained to the conversion refuses --resume without --distill-tokens
                record = convert_and_distill(src, out_dir, opts, distill, resume, checkpoint_dir, keep_checkpoints,
                                             step_reporter(bar))
        except Interrupted as e:
            bar.stop()
            interrupted_exit(e)
    if not is_main_process():
        return
    if as_json:
        print_json(record)
        return
    t = Table(title=f"converted {record['source']} -> {out_dir}")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("plan", record["plan"])
    t.add_row("KV bytes / token", f"{record['kv_bytes_per_token']:,} (source {record['source_kv_bytes_per_token']:,})")
    for name, b in record["kv_bytes_breakdown"].items():
        if b:
            t.add_row(f"  {name}", f"{b:,}")
    t.add_row("KV ratio", f"{record['kv_ratio']:.4f}" + (f" (target {record['target_kv_ratio']:g})" if record.get("target_kv_ratio") else ""))
    if "heldout_kl" in record:
        t.add_row("held-out KL(source || model)", f"{record['heldout_kl']:.4f}")
    t.add_row("max rel. logit error vs source (fp32)", f"{record['check']['max_relative_logit_error_fp32']:.2e}")
    t.add_row("weights dtype", record["dtype"])
    t.add_row("time (s)", " ".join(f"{k} {v:.1f}" for k, v in record["timings_s"].items()))
    out.print(t)
    if record.get("per_group_error"):
        g = Table(title="per-group error (proxy)")
        g.add_column("layers")
        g.add_column("error", justify="right")
        for row in record["per_group_error"]:
            layers = row["layers"]
            g.add_row(f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0]), f"{row['proxy_error']:.4g}")
        out.print(g)
    for d in record.get("distill", []):
        out.print(distill_table(d))


@app.command()
@user_errors
def distill(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A converted CLLA folder (the student).")],
    teacher: Annotated[str, typer.Option(help="The teacher, usually the source: a folder, .gguf file or 'smollm2'.")],
    tokens: DistillTokens,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Write the result here instead of replacing MODEL.")] = None,
    data: Annotated[
        Optional[list[Path]], typer.Option(help="Training text (.txt, or .jsonl with a 'text' field); repeatable. Default: sampled from the teacher.", rich_help_panel=DISTILL)
    ] = None,
    seq_len: SeqLen = DISTILL_DEFAULTS.seq_len,
    batch_size: BatchSize = DISTILL_DEFAULTS.batch_size,
    grad_accum: GradAccum = DISTILL_DEFAULTS.grad_accum,
    lr: Lr = DISTILL_DEFAULTS.lr,
    warmup: Warmup = DISTILL_DEFAULTS.warmup,
    temperature: Temperature = DISTILL_DEFAULTS.temperature,
    hidden_weight: HiddenWeight = DISTILL_DEFAULTS.hidden_weight,
    train: TrainSet = DISTILL_DEFAULTS.train,
    eval_every: EvalEvery = DISTILL_DEFAULTS.eval_every,
    save_every: SaveEvery = DISTILL_DEFAULTS.save_every,
    val_tokens: ValTokens = DISTILL_DEFAULTS.val_tokens,
    sample_tokens: SampleTokens = DISTILL_DEFAULTS.sample_tokens,
    device: Device = DISTILL_DEFAULTS.device,
    grad_checkpointing: GradCkpt = DISTILL_DEFAULTS.grad_checkpointing,
    checkpoint_dir: CkptDir = None,
    resume: Resume = False,
    keep_checkpoints: KeepCkpt = False,
    fsdp: Fsdp = False,
    seed: Annotated[int, typer.Option(help="Seed of the data order and of sampled text.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists; discard an earlier checkpoint.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the updated conversion record as JSON.")] = False,
):
    """Distill a converted model from its teacher: KL on the logits (quantization-aware), AdamW with warm-up and
    cosine decay, validation every --eval-every steps, the best checkpoint exported. The result replaces MODEL
    atomically (or goes to --out). Checkpoints in MODEL.distill; --resume continues exactly; data-parallel under
    `torchrun --nproc-per-node P -m kvconvert distill ...`."""
    from .distill.run import distill_folder

    opts = distill_options(locals(), tokens, data)
    set_threads(threads)
    with progress_bar() as bar:
        progress = task_progress(bar)
        try:
            record = distill_folder(
                model_path, teacher, opts, out_dir, checkpoint_dir, resume, force, keep_checkpoints, log, progress,
                step_reporter(bar),
            )
        except Interrupted as e:
            bar.stop()
            interrupted_exit(e)
    if not is_main_process():
        return
    if as_json:
        print_json(record)
        return
    out.print(distill_table(record["distill"][-1]))


# ----------------------------------------------------------------------------------------------- export
EXPORT_FORMATS = ("deepseek-v3",)


@app.command()
@user_errors
def export(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A converted CLLA folder.")],
    dest: Annotated[Path, typer.Argument(metavar="DEST", help="Output folder (written atomically).")],
    fmt: Annotated[str, typer.Option("--format", help="deepseek-v3: transformers' DeepseekV3ForCausalLM, as vLLM and SGLang serve it.")] = "deepseek-v3",
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the export summary as JSON.")] = False,
):
    """Export a converted model to another format. deepseek-v3 takes plans with one latent per layer, one rope key
    shared by all heads, a normed latent and a 16-bit cache (`kvconvert convert --target deepseek-v3` makes them);
    other plans are refused with the reason."""
    if fmt not in EXPORT_FORMATS:
        raise KvconvertError(f"--format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt}")
    from .convert.deepseek import export_deepseek_v3

    summary = export_deepseek_v3(model_path, dest, force)
    if as_json:
        print_json(summary)
        return
    log(f"wrote {dest}: DeepSeek-V3 ({summary['layers']} layers, kv_lora_rank {summary['kv_lora_rank']}, "
        f"qk_rope_head_dim {summary['qk_rope_head_dim']})")


# ----------------------------------------------------------------------------------------------- eval
def parse_lengths(spec: str, option: str = "--passkey", minimum: int = 64) -> list[int]:
    """Comma-separated counts; a k suffix multiplies by 1024 (4k = 4096)."""
    try:
        lengths = [int(x.strip().lower().removesuffix("k")) * (1024 if x.strip().lower().endswith("k") else 1) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise KvconvertError(f"{option} wants comma-separated counts like 1024,4k; got {spec!r}") from None
    if not lengths or any(n < minimum for n in lengths):
        raise KvconvertError(f"{option} values must be at least {minimum}; got {spec!r}")
    return lengths


@app.command("eval")
@user_errors
def eval_cmd(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="A converted folder or any source (folder, .gguf, 'smollm2').")],
    text: Annotated[Optional[Path], typer.Option(help="UTF-8 text file for perplexity.")] = None,
    window: Annotated[int, typer.Option(help="Tokens per non-overlapping window.")] = 512,
    max_tokens: Annotated[int, typer.Option(help="Tokens of the text read (from its start).")] = 20480,
    reference: Annotated[
        Optional[str], typer.Option(help="Reference model (usually the source): adds top-1 agreement and KL(ref || model).")
    ] = None,
    passkey: Annotated[Optional[str], typer.Option(help="Passkey-retrieval prompt lengths in tokens, e.g. 1024,4096.")] = None,
    passkey_trials: Annotated[int, typer.Option(help="Prompts per passkey length (key depths spread evenly).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    kv_policy: KvPolicyOpt = None,
    kv_budget: KvBudgetOpt = 0.05,
    kv_recent: KvRecentOpt = None,
    kv_residual: KvResidualOpt = None,
    kv_decay: KvDecayOpt = None,
    kv_queries: KvQueriesOpt = None,
    score_last: Annotated[int, typer.Option(help="With --kv-policy: tokens scored at the end of each window (the rest is the context the policy compresses).", rich_help_panel=POLICY)] = 1024,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
):
    """Perplexity on --text (protocol: no BOS, non-overlapping windows, window-1 predictions each), agreement with
    --reference, and passkey retrieval accuracy. With --kv-policy, the model runs in the latent-cache runtime under
    that cache policy (full = no policy), perplexity scores the last --score-last tokens of each window."""
    from .evaluate import passkey_accuracy, read_text, runtime_generator, score_windows, score_windows_with_policy, text_windows
    from .loading import load_any
    from .runtime.policies import make_policy

    if text is None and passkey is None:
        raise KvconvertError("nothing to evaluate: give --text FILE and/or --passkey LENGTHS")
    if passkey_trials < 1:
        raise KvconvertError("--passkey-trials must be at least 1")
    if batch_size < 1:
        raise KvconvertError("--batch-size must be at least 1")
    lengths = parse_lengths(passkey) if passkey else []
    raw = read_text(text) if text is not None else None
    if kv_policy is not None:
        make_policy(kv_policy, kv_budget, kv_recent, kv_residual, kv_decay, kv_queries)  # refuse bad options before loading anything
        if reference is not None:
            raise KvconvertError("--reference is not combined with --kv-policy (compare two eval runs instead)")
    set_threads(threads)
    log(f"loading {model_path}")
    if kv_policy is not None:
        from .loading import load_for_runtime

        loaded = load_for_runtime(model_path)
    else:
        loaded = load_any(model_path)
    if loaded.tokenizer is None:
        raise KvconvertError(f"{model_path}: no tokenizer files; evaluation needs one")
    ref = None
    if reference:
        log(f"loading reference {reference}")
        ref = load_any(reference).model
        if ref.config.vocab_size != loaded.model.config.vocab_size:
            raise KvconvertError("--reference has a different vocabulary; it must share the model's tokenizer")
    result: dict = {"model": model_path, "reference": reference}
    factory = (lambda: make_policy(kv_policy, kv_budget, kv_recent, kv_residual, kv_decay, kv_queries)) if kv_policy is not None else None
    if kv_policy is not None:
        result["kv_policy"] = {"policy": kv_policy, "budget": kv_budget, "recent": kv_recent, "residual": kv_residual,
                               "decay": kv_decay, "queries": kv_queries}
    if raw is not None:
        windows = text_windows(loaded.tokenizer, raw, window, max_tokens)
        with progress_bar() as bar:
            task = bar.add_task("perplexity", total=windows.shape[0])
            report = lambda d, n: bar.update(task, completed=d)  # noqa: E731
            if factory is not None:
                scores = score_windows_with_policy(loaded.model, windows, factory, score_last, progress=report)
            else:
                scores = score_windows(loaded.model, windows, ref, batch_size, report)
            result["text"] = {"file": str(text)} | scores
    if lengths:
        gen = runtime_generator(loaded.model, factory) if factory is not None else None
        with progress_bar() as bar:
            task = bar.add_task("passkey", total=len(lengths) * passkey_trials)
            result["passkey"] = passkey_accuracy(
                loaded.model, loaded.tokenizer, lengths, passkey_trials, progress=lambda d, n: bar.update(task, completed=d),
                generate=gen,
            )
    if as_json:
        print_json(result)
        return
    t = Table(title=f"eval {model_path}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    if "text" in result:
        r = result["text"]
        t.add_row("perplexity", f"{r['perplexity']:.4f}")
        t.add_row("predictions scored", f"{r['predictions']:,} ({r['windows']} × {r['window'] - 1})")
        if ref is not None:
            t.add_row("top-1 agreement", f"{r['top1_agreement']:.2%}")
            t.add_row("KL(ref || model)", f"{r['kl']:.5f}")
    for p in result.get("passkey", []):
        t.add_row(f"passkey {p['length']} tok", f"{p['accuracy']:.0%} of {p['trials']}")
    out.print(t)


# ----------------------------------------------------------------------------------------------- chat
RUNTIME = "Runtime"
ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="A converted folder or any source (folder, .gguf, 'smollm2'; run through an identity conversion).")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.", rich_help_panel=RUNTIME)]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.", rich_help_panel=RUNTIME)]
GraphsOpt = Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay the decode step as a CUDA graph (CUDA only).", rich_help_panel=RUNTIME)]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).", rich_help_panel=RUNTIME)]


POLICY = "Cache policy"
KvPolicyOpt = Annotated[Optional[str], typer.Option(help="Token-budget cache policy: zsmerge (heavy hitters + recent + merged residual slots), h2o, streaming (sinks + recent), or full (the runtime without a policy).", rich_help_panel=POLICY)]
KvBudgetOpt = Annotated[float, typer.Option(help="Tokens each layer group keeps per sequence: a share of the context (< 1) or a count (>= 1).", rich_help_panel=POLICY)]
KvRecentOpt = Annotated[Optional[float], typer.Option(help="Share of the budget kept as the most recent tokens (default: the policy's; zsmerge/h2o 0.5).", rich_help_panel=POLICY, show_default=False)]
KvResidualOpt = Annotated[Optional[float], typer.Option(help="zsmerge: share of the non-recent budget kept as merge slots (default 0.02, at least one slot).", rich_help_panel=POLICY, show_default=False)]
KvDecayOpt = Annotated[Optional[float], typer.Option(help="Per-step decay of accumulated attention (default: zsmerge 0.98, h2o 1).", rich_help_panel=POLICY, show_default=False)]
KvQueriesOpt = Annotated[Optional[int], typer.Option(help="zsmerge/h2o: the prompt's last queries whose (decayed) attention scores the prompt (default 512). Few (e.g. 8): the prompt's closing words, such as a question, choose what is kept.", rich_help_panel=POLICY, show_default=False)]


def load_runtime_model(model_path: str, device: str, dtype: str):
    """MODEL on the device, identity-converted in memory when it is a source."""
    from .loading import load_for_runtime
    from .runtime.chat import auto_device, auto_dtype

    dev = auto_device(device)
    dt = auto_dtype(dtype, dev)
    log(f"loading {model_path} ({dev}, {str(dt).removeprefix('torch.')})")
    return load_for_runtime(model_path, dt, dev)


def open_runtime(model_path: str, device: str, dtype: str, batch: int, context: int | None, cuda_graphs: bool,
                 policy=None):
    """Load MODEL and allocate its cache (with a policy: its budget of the context plus one prefill chunk);
    returns (loaded, runtime)."""
    from .runtime import LatentRuntime

    loaded = load_runtime_model(model_path, device, dtype)
    dev = next(loaded.model.parameters()).device.type
    cfg = loaded.model.config
    capacity = context or min(cfg.max_position_embeddings, 4096)
    if capacity < 2:
        raise KvconvertError("--context must be at least 2")
    if policy is not None:
        try:
            slots = policy.slots(capacity)
        except ValueError as e:
            raise KvconvertError(str(e)) from None
        rt = LatentRuntime(loaded.model, batch, slots + 256, cuda_graphs=False, policy=policy, context=capacity)
    else:
        rt = LatentRuntime(loaded.model, batch, capacity, cuda_graphs=cuda_graphs and dev == "cuda")
    kind = "converted" if loaded.is_clla else "source through an identity conversion"
    what = f", {policy.name} keeping {policy.n_slots:,} of {capacity:,} tokens" if policy is not None else ""
    rings = (f" (sliding-window layers: rings of {min(rt.cache.slots):,} slots)"
             if any(rt.cache.is_ring(g) for g in range(rt.config.num_layer_groups)) else "")
    log(f"{kind}{what}; KV cache {rt.cache.capacity:,} tokens{rings}, {rt.cache.nbytes / 2**20:,.2f} MiB")
    return loaded, rt


@app.command()
@user_errors
def chat(
    model_path: ModelArg,
    prompt: Annotated[Optional[str], typer.Option(help="Answer this one message and exit (scriptable); without it, an interactive session.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.7,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample within the smallest set holding this probability (1: off).")] = 0.9,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    context: Annotated[Optional[int], typer.Option(help="Cache capacity in tokens (default: the model's maximum, at most 4096).", rich_help_panel=RUNTIME)] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    cuda_graphs: GraphsOpt = True,
    kv_policy: KvPolicyOpt = None,
    kv_budget: KvBudgetOpt = 0.05,
    kv_recent: KvRecentOpt = None,
    kv_residual: KvResidualOpt = None,
    kv_decay: KvDecayOpt = None,
    kv_queries: KvQueriesOpt = None,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --prompt: print the reply and its statistics as JSON.")] = False,
):
    """Chat with a model through the latent-cache runtime, streaming the reply. Commands: /reset forgets the
    conversation, /stats shows tokens, KV bytes in use and speed, /exit (or Ctrl-D) quits."""
    from .runtime.chat import ChatSession, stop_tokens
    from .runtime import SamplingOptions

    if as_json and prompt is None:
        raise KvconvertError("--json needs --prompt (one scripted turn)")
    from .runtime.policies import make_policy

    opts = SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed)
    opts.check()
    policy = make_policy(kv_policy, kv_budget, kv_recent, kv_residual, kv_decay, kv_queries) if kv_policy is not None else None
    set_threads(threads)
    loaded, rt = open_runtime(model_path, device, dtype, 1, context, cuda_graphs, policy)
    opts.stop_token_ids = stop_tokens(loaded.generation_config, loaded.tokenizer)
    session = ChatSession(rt, loaded.tokenizer, system)
    if not session.templated:
        log("the tokenizer has no chat template: plain text continuation")
    if prompt is not None:
        if as_json:
            reply, stats = session.reply(prompt, opts)
            print_json({"model": model_path, "prompt": prompt, "reply": reply} | dataclasses.asdict(stats))
        else:
            session.reply(prompt, opts, on_text=lambda t: out.print(t, end="", highlight=False, markup=False, soft_wrap=True))
            out.print()
        return
    err.print("[dim]/reset to start over, /stats for figures, /exit or Ctrl-D to quit[/]")
    last = None
    while True:
        try:
            text = out.input("[bold green]> [/]")
        except EOFError:
            out.print()
            return
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            session.reset()
            err.print("[dim]conversation cleared[/]")
            continue
        if cmd == "/stats":
            out.print(chat_stats_table(rt, last))
            continue
        try:
            _, last = session.reply(text, opts, on_text=lambda t: out.print(t, end="", highlight=False, markup=False, soft_wrap=True))
        except KvconvertError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            continue
        out.print()


def chat_stats_table(rt, last) -> Table:
    from .config import kv_bytes

    t = Table(title="chat")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("tokens in the cache", f"{rt.lengths[0]:,} of {rt.cache.capacity:,}")
    t.add_row("conversation tokens", f"{rt.seen[0]:,} of {rt.context:,}")
    t.add_row("KV bytes in use", f"{kv_bytes(rt.config, rt.lengths[0], rt.cache.ring_chunk):,}")
    t.add_row("KV bytes allocated", f"{rt.cache.nbytes:,}")
    if last is not None:
        t.add_row("last turn: prompt tokens", f"{last.prompt_tokens:,} at {last.prefill_tokens_per_s:,.1f} tok/s")
        t.add_row("last turn: new tokens", f"{last.new_tokens:,} at {last.decode_tokens_per_s:,.1f} tok/s")
    return t


# ----------------------------------------------------------------------------------------------- profile
@profile_app.command("memory")
@user_errors
def profile_memory(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="A converted folder or any source (folder, .gguf, 'smollm2').")],
    context: Annotated[int, typer.Option(help="Tokens per sequence.")] = 32768,
    batch: Annotated[int, typer.Option(help="Sequences.")] = 1,
    budget_gib: Annotated[float, typer.Option(help="Memory for weights + KV cache, GiB.")] = 16.0,
    weight_bytes: Annotated[int, typer.Option(help="Bytes per weight (2 = bf16 serving).")] = 2,
    kv_policy: KvPolicyOpt = None,
    kv_budget: KvBudgetOpt = 0.05,
    measure: Annotated[Optional[bool], typer.Option("--measure/--no-measure", help="Also allocate the real caches at --context × --batch and run a decode step (default: on CUDA only).", show_default=False)] = None,
    source: Annotated[Optional[str], typer.Option(help="With --measure on a converted MODEL: its source, measured through transformers beside it.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
):
    """KV bytes per token by cached tensor, the source's figure and the ratio, totals at --context × --batch, and the
    largest context or batch that fits --budget-gib. With --measure: the bytes the runtime's cache really allocates
    and (on CUDA) the peak memory of a decode step, beside transformers' static cache on the source."""
    from .config import CllaConfig
    from .convert.identity import identity_config
    from .convert.source import load_source_config, model_type_of, resolve
    from .loading import is_clla_folder
    from .runtime.profile import memory_profile

    if context < 1 or batch < 1 or budget_gib <= 0 or weight_bytes < 1:
        raise KvconvertError("--context, --batch, --budget-gib and --weight-bytes must be positive")
    if model_path != "smollm2" and is_clla_folder(model_path):
        try:
            cfg = CllaConfig.from_pretrained(model_path)
        except ValueError as e:
            raise KvconvertError(f"{model_path}/config.json: invalid CLLA plan ({e})") from None
        kind = "converted"
    else:
        ref = resolve(model_path)
        cfg = identity_config(load_source_config(ref), model_type_of(ref), ref.name)
        kind = "source (identity plan)"
    result = {"model": model_path, "kind": kind} | memory_profile(cfg, context, batch, budget_gib, weight_bytes)
    if kv_policy is not None and kv_policy != "full":
        from .runtime.policies import make_policy

        try:
            slots = make_policy(kv_policy, kv_budget).slots(context)
        except ValueError as e:
            raise KvconvertError(str(e)) from None
        per_token = result["kv_bytes_per_token"]["total"]
        result["kv_policy"] = {
            "policy": kv_policy, "budget": kv_budget, "slots_per_sequence": min(slots, context),
            "kv_bytes_total": per_token * min(slots, context) * batch,
            "ratio_to_source_full_cache": per_token * min(slots, context) / (result["source_kv_bytes_per_token"] * context),
        }
    if measure is None:
        import torch

        measure = torch.cuda.is_available() and device != "cpu"
    if measure:
        result["measured"] = measure_memory(model_path, kind == "converted", source, context, batch, device, dtype)
    if as_json:
        print_json(result)
        return
    t = Table(title=f"KV cache of {model_path} ({kind})")
    t.add_column("cached tensor")
    t.add_column("bytes / token", justify="right")
    segments = " + ".join(f"{s['width']} @ {s['bits']}" for s in result["latent_segments"])
    for name, b in result["kv_bytes_per_token"].items():
        if b or name != "key_scales":  # key norms exist only for qk-norm sources (Qwen3, Gemma 3)
            t.add_row(f"latent ({segments} bit)" if name == "latent" else name, f"{b:,}")
    t.add_row("source (16-bit K+V)", f"{result['source_kv_bytes_per_token']:,}")
    t.add_row("ratio", f"{result['kv_ratio']:.4f}")
    out.print(t)
    gib = lambda b: f"{b / 2**30:,.3f} GiB"  # noqa: E731
    s = Table(title=f"context {context:,} × batch {batch}, budget {budget_gib:g} GiB (weights at {weight_bytes} B)")
    s.add_column("")
    s.add_column("converted", justify="right")
    s.add_column("source", justify="right")
    c, o = result["converted"], result["source"]
    s.add_row("KV cache", gib(c["kv_bytes_total"]), gib(o["kv_bytes_total"]))
    s.add_row("weights", gib(c["weights_bytes"]), gib(o["weights_bytes"]))
    s.add_row(f"max context at batch {batch}", f"{c['max_context_at_batch']:,}", f"{o['max_context_at_batch']:,}")
    s.add_row(f"max batch at context {context:,}", f"{c['max_batch_at_context']:,}", f"{o['max_batch_at_context']:,}")
    s.add_row("KV cache, converted / source", f"{result['kv_ratio_at_context']:.4f}", "")
    if "kv_policy" in result:
        p = result["kv_policy"]
        s.add_row(f"KV cache with {p['policy']} ({p['slots_per_sequence']:,} tokens kept)", gib(p["kv_bytes_total"]), "")
        s.add_row("… as a share of the source's full cache", f"{p['ratio_to_source_full_cache']:.4%}", "")
    out.print(s)
    if "measured" in result:
        m = result["measured"]
        t = Table(title=f"measured on {m['device']} ({m['dtype']}): context {context:,} × batch {batch}")
        t.add_column("")
        t.add_column("converted", justify="right")
        t.add_column("source (transformers)", justify="right")
        conv, srcm = m.get("converted", {}), m.get("source", {})
        fmt = lambda d, k: gib(d[k]) if k in d else "—"  # noqa: E731
        t.add_row("KV cache predicted", gib(c["kv_bytes_total"]), gib(o["kv_bytes_total"]) if srcm else "—")
        t.add_row("KV cache allocated", fmt(conv, "kv_bytes_allocated"), fmt(srcm, "kv_bytes_allocated"))
        t.add_row("peak above weights, decode step", fmt(conv, "peak_bytes_during_decode"), fmt(srcm, "peak_bytes_during_decode"))
        out.print(t)
        if "note" in m:
            err.print(f"[dim]{m['note']}[/]")


def measure_memory(model_path: str, converted: bool, source: str | None, context: int, batch: int, device: str, dtype: str) -> dict:
    """The measured part of `profile memory`: the runtime's cache on MODEL, transformers' static cache on the source."""
    import torch

    from .loading import load_any, load_for_runtime
    from .runtime.chat import auto_device, auto_dtype
    from .runtime.profile import measure_converted_memory, measure_source_memory

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


@profile_app.command("speed")
@user_errors
def profile_speed(
    model_path: ModelArg,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    context: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "512",
    steps: Annotated[int, typer.Option(help="Decode steps timed per point.")] = 16,
    source: Annotated[Optional[str], typer.Option(help="Time this source model with transformers' generate (static cache, SDPA) beside MODEL; default: MODEL itself when it is a source.")] = None,
    prefill: Annotated[bool, typer.Option("--prefill/--no-prefill", help="Time the prefill of each point (else the cache is filled with random codes, for decode only).")] = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    cuda_graphs: GraphsOpt = True,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
):
    """Prefill and decode tokens/s and achieved GB/s (counted bytes: weights + cache read per decode step) of MODEL in
    the latent-cache runtime over a batch × context grid, beside transformers' own generate on the source."""
    import platform

    import torch
    import transformers

    from . import __version__
    from .loading import is_clla_folder, load_any
    from .runtime.profile import time_converted, time_source

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
    with progress_bar() as bar:
        task = bar.add_task("profile speed", total=len(batches) * len(contexts))
        for b in batches:
            for c in contexts:
                point: dict = {"batch": b, "context": c}
                point["runtime"] = time_converted(model, b, c, steps, prefill, cuda_graphs and dev.type == "cuda")
                if src_model is not None:
                    point["transformers"] = time_source(src_model, b, c, steps)
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
        "points": points,
    }
    if as_json:
        print_json(result)
        return
    t = Table(title=f"speed of {model_path} on {result['device']} ({result['dtype']})")
    t.caption = "hf = transformers' generate on the source (static cache, SDPA); × = decode tok/s over hf's"
    for col in ("batch", "context", "prefill tok/s", "decode tok/s", "GB/s", "hf prefill", "hf decode", "hf GB/s", "×"):
        t.add_column(col, justify="right")
    for p in points:
        r, h = p["runtime"], p.get("transformers")
        t.add_row(
            str(p["batch"]), f"{p['context']:,}",
            f"{r['prefill_tokens_per_s']:,.0f}" if "prefill_tokens_per_s" in r else "—",
            f"{r['decode_tokens_per_s']:,.1f}", f"{r['achieved_gb_per_s']:,.1f}",
            f"{h['prefill_tokens_per_s']:,.0f}" if h else "—",
            f"{h['decode_tokens_per_s']:,.1f}" if h else "—", f"{h['achieved_gb_per_s']:,.1f}" if h else "—",
            f"{p['decode_speedup']:.2f}" if h else "—",
        )
    out.print(t)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kvconvert reports its own progress; transformers' tqdm bars clutter stderr
    app()


if __name__ == "__main__":
    main()
