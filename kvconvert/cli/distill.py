"""`kvconvert distill`: continue training a converted model from its teacher (kvconvert.distill)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import is_main_process, log, out, print_json, return_freed_memory, set_threads, step_reporter, task_progress, training_progress_bar, user_errors
from .options import DISTILL, DistillFlags, DistillTokens, Threads, force_option, json_option, option_groups
from .render import distill_table

ForceOut = force_option("Replace --out if it exists; discard an earlier checkpoint.")
RecordJson = json_option("Print the updated conversion record as JSON.")


@user_errors
@option_groups(flags=DistillFlags)
def distill(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A converted CLLA folder (the student).")],
    teacher: Annotated[str, typer.Option(help="The teacher, usually the source: a folder, .gguf file or 'smollm2'.")],
    tokens: DistillTokens,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Write the result here instead of replacing MODEL.")] = None,
    data: Annotated[
        Optional[list[Path]], typer.Option(help="Training text (.txt, or .jsonl with a 'text' field, or conversations: 'messages' or 'prompt'); repeatable. For an instruct teacher, conversations join the text as a quarter of the two: those in the files answered by the teacher, else ones it writes. Default: sampled from the teacher.", rich_help_panel=DISTILL)
    ] = None,
    flags: DistillFlags = DistillFlags(),
    seed: Annotated[int, typer.Option(help="Seed of the data order and of sampled text.")] = 0,
    force: ForceOut = False,
    threads: Threads = None,
    as_json: RecordJson = False,
):
    """Distill a converted model from its teacher: KL on the logits (quantization-aware), AdamW with warm-up and
    cosine decay, validation every --eval-every steps, the best checkpoint exported. The result replaces MODEL
    atomically (or goes to --out). Checkpoints in MODEL.distill; --resume continues exactly; data-parallel under
    `torchrun --nproc-per-node P -m kvconvert distill ...`."""
    from ..distill.run import distill_folder

    opts = flags.options(tokens, data, seed)
    set_threads(threads)
    return_freed_memory()  # freed activations go back to the system instead of staying in a fragmented heap
    with training_progress_bar() as bar:
        record = distill_folder(
            model_path, teacher, opts, out_dir, flags.checkpoint_dir, flags.resume, force, flags.keep_checkpoints,
            log, task_progress(bar), step_reporter(bar),
        )
    if not is_main_process():
        return
    if as_json:
        print_json(record)
        return
    out.print(distill_table(record["distill"][-1]))
