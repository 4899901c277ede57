"""`kvconvert eval`: perplexity, agreement with a reference, passkey retrieval; optionally under a cache policy."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import KvconvertError
from .common import log, out, parse_lengths, print_json, progress_bar, set_threads, user_errors
from .options import POLICY, AnyModel, AsJson, PolicyOptions, Threads, option_groups
from .render import eval_table


@user_errors
@option_groups(kv=PolicyOptions)
def eval_cmd(
    model_path: AnyModel,
    text: Annotated[Optional[Path], typer.Option(help="UTF-8 text file for perplexity.")] = None,
    window: Annotated[int, typer.Option(help="Tokens per non-overlapping window.")] = 512,
    max_tokens: Annotated[int, typer.Option(help="Tokens of the text read (from its start).")] = 20480,
    reference: Annotated[
        Optional[str], typer.Option(help="Reference model (usually the source): adds top-1 agreement and KL(ref || model).")
    ] = None,
    passkey: Annotated[Optional[str], typer.Option(help="Passkey-retrieval prompt lengths in tokens, e.g. 1024,4096.")] = None,
    passkey_trials: Annotated[int, typer.Option(help="Prompts per passkey length (key depths spread evenly).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    kv: PolicyOptions = PolicyOptions(),
    score_last: Annotated[int, typer.Option(help="With --kv-policy: tokens scored at the end of each window (the rest is the context the policy compresses).", rich_help_panel=POLICY)] = 1024,
    threads: Threads = None,
    as_json: AsJson = False,
):
    """Perplexity on --text (protocol: no BOS, non-overlapping windows, window-1 predictions each), agreement with
    --reference, and passkey retrieval accuracy. With --kv-policy, the model runs in the latent-cache runtime under
    that cache policy (full = no policy), perplexity scores the last --score-last tokens of each window."""
    from ..evaluate import passkey_accuracy, read_text, runtime_generator, score_windows, score_windows_with_policy, text_windows
    from ..loading import load_any, load_for_runtime

    if text is None and passkey is None:
        raise KvconvertError("nothing to evaluate: give --text FILE and/or --passkey LENGTHS")
    if passkey_trials < 1:
        raise KvconvertError("--passkey-trials must be at least 1")
    if batch_size < 1:
        raise KvconvertError("--batch-size must be at least 1")
    lengths = parse_lengths(passkey) if passkey else []
    raw = read_text(text) if text is not None else None
    # With --kv-policy (full included) the model runs in the runtime; `factory` makes one policy per sequence.
    factory = kv.make if kv.policy is not None else None
    if factory is not None:
        kv.check()
        if reference is not None:
            raise KvconvertError("--reference is not combined with --kv-policy (compare two eval runs instead)")
    set_threads(threads)
    log(f"loading {model_path}")
    loaded = load_for_runtime(model_path) if factory is not None else load_any(model_path)
    if loaded.tokenizer is None:
        raise KvconvertError(f"{model_path}: no tokenizer files; evaluation needs one")
    ref = None
    if reference:
        log(f"loading reference {reference}")
        ref = load_any(reference).model
        if ref.config.vocab_size != loaded.model.config.vocab_size:
            raise KvconvertError("--reference has a different vocabulary; it must share the model's tokenizer")
    result: dict = {"model": model_path, "reference": reference}
    if factory is not None:
        result["kv_policy"] = dataclasses.asdict(kv)
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
    out.print(eval_table(result))
