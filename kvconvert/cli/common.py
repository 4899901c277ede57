"""What every command uses: the consoles, user errors as one line, logs and progress bars on stderr, JSON on stdout,
threads, torchrun's process rank, parsing of count lists, and loading a model into the latent-cache runtime."""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..distill.train import Interrupted
from ..errors import KvconvertError
from .options import check_budget

out = Console()  # results
err = Console(stderr=True)  # logs, progress and errors

# A policy's cache holds its budget of the context plus this many tokens: room for one prefill chunk.
PREFILL_CHUNK_TOKENS = 256  # under a cache policy: the most prompt tokens cached before it compresses


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


def is_main_process() -> bool:
    """False in the processes torchrun starts beside rank 0: they train but print nothing."""
    return int(os.environ.get("RANK", 0)) == 0


def log(msg: str) -> None:
    if is_main_process():
        err.print(f"[dim]•[/] {msg}", highlight=False)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


MMAP_THRESHOLD = 1 << 20  # bytes: what glibc's malloc allocates at or above this size it maps alone (see below)


def return_freed_memory() -> bool:
    """Have glibc's malloc map every allocation of MMAP_THRESHOLD bytes or more on its own, so that freeing it
    gives it back to the system. By default the threshold rises to the largest block freed so far (up to 32 MB), and
    a conversion's many freed matrices of a few MB then stay in the heap, fragmented, counted as the process's
    memory (docs/design.md, "Conversion memory"). Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD (glibc's malloc.h)
    except (OSError, AttributeError):
        return False


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


def task_progress(bar: Progress):
    """A `progress(what, done, total)` callback drawing one bar task per `what`."""
    tasks: dict = {}

    def progress(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done)

    return progress


def step_reporter(bar: Progress):
    """A `step_progress(step, steps, metrics)` callback for a distillation's training loop."""
    task = None

    def report(step: int, steps: int, m: dict) -> None:
        """Loss, throughput and best validation KL in the bar's description; the bar adds elapsed time and ETA."""
        nonlocal task
        text = f"distilling · loss {m['loss']:.4f} · {m['tokens_per_s']:,.0f} tok/s · best val KL {m['best_kl']:.4f}"
        if task is None:
            task = bar.add_task(text, total=steps, completed=step)
        bar.update(task, completed=step, description=text)

    return report


@contextmanager
def training_progress_bar() -> Iterator[Progress]:
    """A progress bar for a command that may train: a distillation stopped by a signal (it saved a checkpoint) ends
    the command with a message saying how to resume, and exit code 128 + the signal."""
    with progress_bar() as bar:
        try:
            yield bar
        except Interrupted as e:
            bar.stop()
            err.print(f"[bold yellow]stopped:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + int(e.signum)) from None


def parse_lengths(spec: str, option: str = "--passkey", minimum: int = 64) -> list[int]:
    """Comma-separated counts; a k suffix multiplies by 1024 (4k = 4096)."""
    try:
        lengths = [int(x.strip().lower().removesuffix("k")) * (1024 if x.strip().lower().endswith("k") else 1) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise KvconvertError(f"{option} wants comma-separated counts like 1024,4k; got {spec!r}") from None
    if not lengths or any(n < minimum for n in lengths):
        raise KvconvertError(f"{option} values must be at least {minimum}; got {spec!r}")
    return lengths


def load_runtime_model(model_path: str, device: str, dtype: str):
    """MODEL on the device, identity-converted in memory when it is a source."""
    from ..loading import load_for_runtime
    from ..runtime.chat import auto_device, auto_dtype

    dev = auto_device(device)
    dt = auto_dtype(dtype, dev)
    log(f"loading {model_path} ({dev}, {str(dt).removeprefix('torch.')})")
    return load_for_runtime(model_path, dt, dev)


def open_runtime(model_path: str, device: str, dtype: str, batch: int, context: int | None, cuda_graphs: bool,
                 policy=None):
    """Load MODEL and allocate its cache (with a policy: its budget of the context plus one prefill chunk);
    returns (loaded, runtime)."""
    from ..runtime import LatentRuntime

    loaded = load_runtime_model(model_path, device, dtype)
    dev = next(loaded.model.parameters()).device.type
    cfg = loaded.model.config
    capacity = context or min(cfg.max_position_embeddings, 4096)
    if capacity < 2:
        raise KvconvertError("--context must be at least 2")
    if policy is not None:
        check_budget(policy.budget, capacity)
    # cpu_layout: the model was loaded here, so re-laying out its weights for one-row products changes nobody's copy
    rt = LatentRuntime.for_context(loaded.model, batch, capacity, policy, prefill_chunk=PREFILL_CHUNK_TOKENS,
                                   cuda_graphs=cuda_graphs and dev == "cuda",
                                   cpu_layout=batch == 1)
    kind = "converted" if loaded.is_clla else "source through an identity conversion"
    what = f", {policy.name} keeping {policy.n_slots:,} of {capacity:,} tokens" if policy is not None else ""
    rings = (f" (sliding-window layers: rings of {min(rt.cache.slots):,} slots)"
             if any(rt.cache.is_ring(g) for g in range(rt.config.num_layer_groups)) else "")
    log(f"{kind}{what}; KV cache {rt.cache.capacity:,} tokens{rings}, {rt.cache.nbytes / 2**20:,.2f} MiB")
    return loaded, rt
