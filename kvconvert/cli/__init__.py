"""The kvconvert command line (Typer): one module per command. The only package that prints: results to stdout,
progress and logs to stderr (common.py), tables in render.py, shared options in options.py."""

from __future__ import annotations

import typer

from .chat import chat
from .convert import convert
from .distill import distill
from .eval import eval_cmd
from .export import export
from .profile import profile_memory, profile_speed

app = typer.Typer(
    name="kvconvert",
    help="Shrink the KV cache of an LLM: convert a checkpoint to Cross-Layer Latent Attention, evaluate and profile it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("convert")(convert)
app.command("distill")(distill)
app.command("export")(export)
app.command("eval")(eval_cmd)
app.command("chat")(chat)

profile_app = typer.Typer(help="Memory (and, with the runtime, speed) profiles of a model.", no_args_is_help=True)
profile_app.command("memory")(profile_memory)
profile_app.command("speed")(profile_speed)
app.add_typer(profile_app, name="profile")


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # kvconvert reports its own progress; transformers' tqdm bars clutter stderr
    app()
