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
    kv_bits: Annotated[Optional[int], typer.Option(help="Latent bits: 16, 8 or 4.")] = None,
    rope_bits: Annotated[Optional[int], typer.Option(help="Rope-key bits: 16, 8 or 4.")] = None,
    quant_group: Annotated[Optional[int], typer.Option(help="Values per quantization scale/zero-point.")] = None,
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
    from .convert.plan import Overrides

    distill = distill_options(locals(), distill_tokens, data) if distill_tokens is not None else None
    set_threads(threads)
    overrides = Overrides(
        latent_dim=latent_dim, group_size=group_size, rope_dim=rope_dim, rope_heads=rope_heads, kv_bits=kv_bits,
        rope_bits=rope_bits, quant_group=quant_group,
    )
    with progress_bar() as bar:
        progress = task_progress(bar)
        opts = ConvertOptions(
            identity=identity, kv_ratio=kv_ratio, overrides=overrides, group_sizes=parse_group_sizes(groups),
            data=list(data or []), calib_tokens=calib_tokens, seed=seed, force=force, dtype=dtype, log=log,
            progress=progress, step_progress=step_reporter(bar), distill=distill, resume=resume,
            checkpoint_dir=checkpoint_dir, keep_checkpoints=keep_checkpoints,
        )
        try:
            record = run_convert(src, out_dir, opts)
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


# ----------------------------------------------------------------------------------------------- eval
def parse_lengths(spec: str) -> list[int]:
    try:
        lengths = [int(x.replace("k", "000")) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise KvconvertError(f"--passkey wants comma-separated token counts like 1024,4096; got {spec!r}") from None
    if not lengths or any(n < 64 for n in lengths):
        raise KvconvertError(f"--passkey lengths must be at least 64 tokens; got {spec!r}")
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
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
):
    """Perplexity on --text (protocol: no BOS, non-overlapping windows, window-1 predictions each), agreement with
    --reference, and passkey retrieval accuracy."""
    from .evaluate import passkey_accuracy, read_text, score_windows, text_windows
    from .loading import load_any

    if text is None and passkey is None:
        raise KvconvertError("nothing to evaluate: give --text FILE and/or --passkey LENGTHS")
    if passkey_trials < 1:
        raise KvconvertError("--passkey-trials must be at least 1")
    if batch_size < 1:
        raise KvconvertError("--batch-size must be at least 1")
    lengths = parse_lengths(passkey) if passkey else []
    raw = read_text(text) if text is not None else None
    set_threads(threads)
    log(f"loading {model_path}")
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
    if raw is not None:
        windows = text_windows(loaded.tokenizer, raw, window, max_tokens)
        with progress_bar() as bar:
            task = bar.add_task("perplexity", total=windows.shape[0])
            result["text"] = {"file": str(text)} | score_windows(
                loaded.model, windows, ref, batch_size, lambda d, n: bar.update(task, completed=d)
            )
    if lengths:
        with progress_bar() as bar:
            task = bar.add_task("passkey", total=len(lengths) * passkey_trials)
            result["passkey"] = passkey_accuracy(
                loaded.model, loaded.tokenizer, lengths, passkey_trials, progress=lambda d, n: bar.update(task, completed=d)
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


# ----------------------------------------------------------------------------------------------- profile
@profile_app.command("memory")
@user_errors
def profile_memory(
    model_path: Annotated[str, typer.Argument(metavar="MODEL", help="A converted folder or any source (folder, .gguf, 'smollm2').")],
    context: Annotated[int, typer.Option(help="Tokens per sequence.")] = 32768,
    batch: Annotated[int, typer.Option(help="Sequences.")] = 1,
    budget_gib: Annotated[float, typer.Option(help="Memory for weights + KV cache, GiB.")] = 16.0,
    weight_bytes: Annotated[int, typer.Option(help="Bytes per weight (2 = bf16 serving).")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
):
    """KV bytes per token by cached tensor, the source's figure and the ratio, totals at --context × --batch, and the
    largest context or batch that fits --budget-gib."""
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
    if as_json:
        print_json(result)
        return
    t = Table(title=f"KV cache of {model_path} ({kind})")
    t.add_column("cached tensor")
    t.add_column("bytes / token", justify="right")
    for name, b in result["kv_bytes_per_token"].items():
        t.add_row(name, f"{b:,}")
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
    out.print(s)


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kvconvert reports its own progress; transformers' tqdm bars clutter stderr
    app()


if __name__ == "__main__":
    main()
