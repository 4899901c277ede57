"""`kvconvert chat`: a conversation through the latent-cache runtime, one scripted turn or an interactive session."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Optional

import typer

from ..errors import KvconvertError
from .common import err, log, open_runtime, out, print_json, set_threads, user_errors
from .options import RUNTIME, CudaGraphs, PolicyOptions, RuntimeDevice, RuntimeDtype, RuntimeModel, RuntimeThreads, json_option, option_groups
from .render import chat_stats_table

ReplyJson = json_option("With --prompt: print the reply and its statistics as JSON.")


@user_errors
@option_groups(kv=PolicyOptions)
def chat(
    model_path: RuntimeModel,
    prompt: Annotated[Optional[str], typer.Option(help="Answer this one message and exit (scriptable); without it, an interactive session.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.7,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample within the smallest set holding this probability (1: off).")] = 0.9,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    context: Annotated[Optional[int], typer.Option(help="Cache capacity in tokens (default: the model's maximum, at most 4096).", rich_help_panel=RUNTIME)] = None,
    device: RuntimeDevice = "auto",
    dtype: RuntimeDtype = "auto",
    cuda_graphs: CudaGraphs = True,
    kv: PolicyOptions = PolicyOptions(),
    threads: RuntimeThreads = None,
    as_json: ReplyJson = False,
):
    """Chat with a model through the latent-cache runtime, streaming the reply. Commands: /reset forgets the
    conversation, /stats shows tokens, KV bytes in use and speed, /exit (or Ctrl-D) quits."""
    from ..runtime import SamplingOptions
    from ..runtime.chat import ChatSession, stop_tokens

    if as_json and prompt is None:
        raise KvconvertError("--json needs --prompt (one scripted turn)")
    opts = SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed)
    opts.check()
    policy = kv.make()
    if policy is not None and policy.scoring == "reconstruct":
        raise KvconvertError("--kv-score reconstruct scores a prompt compressed at once (eval); chat compresses as "
                             "the conversation grows, by attention")
    set_threads(threads)
    loaded, rt = open_runtime(model_path, device, dtype, 1, context, cuda_graphs, policy)
    opts.stop_token_ids = stop_tokens(loaded.generation_config, loaded.tokenizer)
    session = ChatSession(rt, loaded.tokenizer, system)
    if not session.templated:
        log("the tokenizer has no chat template: plain text continuation")
    if prompt is None:
        interactive(session, rt, opts)
    elif as_json:
        reply, stats = session.reply(prompt, opts)
        print_json({"model": model_path, "prompt": prompt, "reply": reply} | dataclasses.asdict(stats))
    else:
        session.reply(prompt, opts, on_text=stream)
        out.print()


def stream(text: str) -> None:
    """Print a piece of a reply as it comes, verbatim."""
    out.print(text, end="", highlight=False, markup=False, soft_wrap=True)


def interactive(session, rt, opts) -> None:
    """Read messages until /exit or end of input; a turn's user error is printed and the session goes on."""
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
            _, last = session.reply(text, opts, on_text=stream)
        except KvconvertError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            continue
        out.print()
