"""`kvconvert eval`: perplexity, agreement with a reference, passkey retrieval, the long-context suite and chat
agreement; optionally under a cache policy."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import KvconvertError
from .common import log, out, parse_lengths, print_json, progress_bar, set_threads, user_errors
from .options import POLICY, AnyModel, AsJson, PolicyOptions, Threads, option_groups
from .render import eval_tables

LONG = "Long-context suite"
GPU_TRIALS = 96  # a 95% interval of about ±10 points on an accuracy near 50%
CPU_TRIALS = 5


@user_errors
@option_groups(kv=PolicyOptions)
def eval_cmd(
    model_path: AnyModel,
    text: Annotated[Optional[Path], typer.Option(help="UTF-8 text file: perplexity, and with --long the haystack and long-window perplexity.")] = None,
    window: Annotated[int, typer.Option(help="Tokens per non-overlapping window.")] = 512,
    max_tokens: Annotated[int, typer.Option(help="Tokens of the text read (from its start).")] = 20480,
    reference: Annotated[
        Optional[str], typer.Option(help="Reference model (usually the source): adds top-1 agreement and KL(ref || model); with --long, every prompt is paired with it.")
    ] = None,
    passkey: Annotated[Optional[str], typer.Option(help="Passkey-retrieval prompt lengths in tokens, e.g. 1024,4096.")] = None,
    passkey_trials: Annotated[int, typer.Option(help="Prompts per passkey length (key depths spread evenly).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    long: Annotated[bool, typer.Option("--long", help="Run the long-context suite: needle, multi-key, multi-value and variable-tracking prompts (a generated haystack, or --text), long-window perplexity on --text, and chat agreement with --reference.", rich_help_panel=LONG)] = False,
    lengths: Annotated[Optional[str], typer.Option(help="Suite prompt lengths, e.g. 2k,4k (default: 1k,2k,4k,8k up to the model's positions).", rich_help_panel=LONG)] = None,
    tasks: Annotated[str, typer.Option(help="Suite tasks, comma-separated: single, multikey, multivalue, variables.", rich_help_panel=LONG)] = "single,multikey,multivalue,variables",
    trials: Annotated[Optional[int], typer.Option(help=f"Prompts per task and length (default: {GPU_TRIALS} on CUDA, about ±10 points at 95%; {CPU_TRIALS} on CPU).", rich_help_panel=LONG)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the suite's prompts (and the chat prompts).", rich_help_panel=LONG)] = 0,
    chat: Annotated[Optional[int], typer.Option(help="Chat prompts for chat agreement with --reference (default: 8 when the tokenizer has a chat template; 0: none).", rich_help_panel=LONG)] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    kv: PolicyOptions = PolicyOptions(),
    score_last: Annotated[int, typer.Option(help="With --kv-policy: tokens scored at the end of each window (the rest is the context the policy compresses).", rich_help_panel=POLICY)] = 1024,
    query_aware: Annotated[bool, typer.Option("--query-aware", help="With --kv-policy and --long: compress each prompt with its question, which then takes part in choosing what is kept (default: compress the haystack, then ask, as a question that comes later would be).", rich_help_panel=POLICY)] = False,
    threads: Threads = None,
    as_json: AsJson = False,
):
    """Perplexity on --text (protocol: no BOS, non-overlapping windows, window-1 predictions each), agreement with
    --reference, passkey retrieval and, with --long, the long-context suite (docs/design.md: "Long-context suite").
    With --kv-policy, the model runs in the latent-cache runtime under that cache policy (full = no policy) and
    perplexity scores the last --score-last tokens of each window; --reference then runs with its full cache."""
    from ..evaluate import (passkey_accuracy, read_text, repeat_ids, runtime_generator, score_windows,
                            score_windows_with_policy, text_windows)
    from ..loading import load_any, load_for_runtime
    from ..longcontext import TASKS
    from ..runtime.chat import auto_device

    if text is None and passkey is None and not long:
        raise KvconvertError("nothing to evaluate: give --text FILE, --passkey LENGTHS and/or --long")
    if passkey_trials < 1:
        raise KvconvertError("--passkey-trials must be at least 1")
    if batch_size < 1:
        raise KvconvertError("--batch-size must be at least 1")
    if trials is not None and trials < 1:
        raise KvconvertError("--trials must be at least 1")
    if chat is not None and chat < 0:
        raise KvconvertError("--chat must be 0 or more")
    suite_tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in suite_tasks if t not in TASKS]
    if unknown or not suite_tasks:
        raise KvconvertError(f"unknown --tasks {', '.join(unknown) or repr(tasks)}: choose from {', '.join(TASKS)}")
    asked_lengths = parse_lengths(lengths, "--lengths", minimum=128) if lengths else None
    passkey_lengths = parse_lengths(passkey) if passkey else []
    raw = read_text(text) if text is not None else None
    dev = auto_device(device)
    # With --kv-policy (full included) the model runs in the runtime; `factory` makes one policy per sequence.
    factory = kv.make if kv.policy is not None else None
    if factory is not None:
        # the longest sequence this run gives the policy, where it is known before loading (--long's default
        # lengths follow the model's positions)
        known = ([window] if raw is not None else []) + passkey_lengths + (asked_lengths or [])
        kv.check(None if long and asked_lengths is None else max(known, default=None))
        if reference is not None and not long:
            raise KvconvertError("--reference is combined with --kv-policy only for --long (compare two eval runs instead)")
    if query_aware and (factory is None or not long):
        raise KvconvertError("--query-aware applies to --long under a --kv-policy")
    set_threads(threads)
    log(f"loading {model_path} ({dev})")
    loaded = load_for_runtime(model_path, device=dev) if factory is not None else load_any(model_path)
    loaded.model.to(dev)
    tok = loaded.tokenizer
    if tok is None:
        raise KvconvertError(f"{model_path}: no tokenizer files; evaluation needs one")
    ref = None
    if reference:
        log(f"loading reference {reference}")
        ref = load_any(reference).model.to(dev)
        if ref.config.vocab_size != loaded.model.config.vocab_size:
            raise KvconvertError("--reference has a different vocabulary; it must share the model's tokenizer")
    result: dict = {"model": model_path, "reference": reference, "device": dev}
    if factory is not None:
        result["kv_policy"] = dataclasses.asdict(kv)
    repeat = repeat_ids(tok)  # what a policy scored by reconstruction reads before each chunk of a prompt
    if raw is not None:
        windows = text_windows(tok, raw, window, max_tokens)
        with progress_bar() as bar:
            task = bar.add_task("perplexity", total=windows.shape[0])
            report = lambda d, n: bar.update(task, completed=d)  # noqa: E731
            if factory is not None:
                scores = score_windows_with_policy(loaded.model, windows, factory, score_last, progress=report,
                                                   repeat=repeat)
            else:
                scores = score_windows(loaded.model, windows, ref, batch_size, report)
            result["text"] = {"file": str(text)} | scores
    gen = runtime_generator(loaded.model, factory, repeat=repeat, query_aware=query_aware) if factory is not None else None
    if passkey_lengths:
        with progress_bar() as bar:
            task = bar.add_task("passkey", total=len(passkey_lengths) * passkey_trials)
            result["passkey"] = passkey_accuracy(
                loaded.model, tok, passkey_lengths, passkey_trials, progress=lambda d, n: bar.update(task, completed=d),
                generate=gen,
            )
    if long:
        n_trials = trials or (GPU_TRIALS if dev.startswith("cuda") else CPU_TRIALS)
        if trials is None and not dev.startswith("cuda"):
            log(f"{n_trials} trials per task and length (the CPU default: a 95% interval of up to ±44 points; "
                f"--trials {GPU_TRIALS} gives ±10)")
        if gen is None and loaded.is_clla:  # a converted model answers as it is served: through the runtime
            gen = runtime_generator(loaded.model, lambda: None)
        result["long"] = long_context(loaded.model, tok, ref, raw, suite_tasks, asked_lengths, n_trials, seed,
                                      max_tokens, chat, factory, gen, repeat)
        if factory is not None:
            result["long"]["question"] = "in the compressed prompt" if query_aware else "after compression"
    if as_json:
        print_json(result)
        return
    for table in eval_tables(result):
        out.print(table)


def long_context(model, tok, ref, raw: str | None, tasks: list[str], asked: list[int] | None, trials: int, seed: int,
                 max_tokens: int, chat: int | None, factory, gen, repeat: list[int] | None = None) -> dict:
    """The suite on the model (and the reference, paired), long-window perplexity on the text, chat agreement."""
    from ..chat_fidelity import chat_agreement, has_chat_template
    from ..longcontext import compare_suites, long_perplexity, prompt_length, run_suite, suite_lengths, text_sentences

    positions = min(m.config.max_position_embeddings for m in (model, ref) if m is not None)
    lengths = suite_lengths(asked, positions)
    sentences = None
    if raw is not None:
        n_text = len(tok(raw, add_special_tokens=False).input_ids)
        if n_text < max(lengths):
            raise KvconvertError(f"--text has {n_text:,} tokens: too short a haystack for {max(lengths):,}-token prompts")
        sentences = text_sentences(raw)
    sizes = {n: prompt_length(n, positions) for n in lengths}
    result: dict = {"lengths": lengths, "tasks": tasks, "trials": trials, "seed": seed,
                    "haystack": "text" if raw is not None else "generated"}

    def suite(m, generate, what):
        with progress_bar() as bar:
            task = bar.add_task(f"long-context suite ({what})", total=len(tasks) * len(lengths) * trials)
            rows = run_suite(m, tok, tasks, [sizes[n] for n in lengths], trials, seed, sentences, generate,
                             lambda d, n: bar.update(task, completed=d))
        for row, n in zip(rows, [n for _ in tasks for n in lengths]):
            row["length"] = n  # the row's nominal length (its prompts may leave room for the reply)
        return rows

    rows = suite(model, gen, "model")
    result["suite"] = compare_suites(rows, suite(ref, None, "reference")) if ref is not None else rows
    if raw is not None:
        result["perplexity"] = []
        for n in lengths:
            with progress_bar() as bar:
                task = bar.add_task(f"long-window perplexity ({n:,})", total=None)
                r = long_perplexity(model, tok, raw, n, max_tokens, ref, factory,
                                    lambda d, t: bar.update(task, completed=d, total=t), repeat)
            result["perplexity"].append({"length": n} | r)
    if ref is not None and (chat is None or chat > 0):
        if factory is not None:
            result["chat_skipped"] = "not measured under a cache policy"
        elif has_chat_template(tok):
            with progress_bar() as bar:
                task = bar.add_task("chat agreement", total=chat or 8)
                result["chat"] = chat_agreement(model, ref, tok, chat or 8, seed=seed,
                                                progress=lambda d, n: bar.update(task, completed=d))
        elif chat:
            raise KvconvertError("--chat: the tokenizer has no chat template")
    return result
