"""Shared by the benchmark scripts (run from the repo root as `python -m bench.<name>`): the environment record
every JSON result carries, where results go (bench/results/), the data files, SmolLM2's default calibration."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # beside the repo: ../shared/data


def environment() -> dict:
    import torch
    import transformers

    import kvconvert

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvconvert": kvconvert.__version__,
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


@contextlib.contextmanager
def peak_memory(device):
    """Measures the peak memory of the block: yields a dict that holds, after it, `peak_rss_gib` (the process's
    resident high-water mark, VmHWM, reset on entry through /proc/self/clear_refs) and on CUDA `cuda_max_allocated_gib`
    (torch's allocator peak, reset on entry). Linux only; elsewhere the RSS figure is left out."""
    import torch

    out: dict = {}
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    linux = status.exists() and clear.exists()
    if linux:
        clear.write_text("5")  # resets VmHWM to the current RSS
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        yield out
    finally:
        if linux:
            kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
            out["peak_rss_gib"] = round(kib / (1 << 20), 3)
        if cuda:
            out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / (1 << 30), 3)


def main_module() -> str | None:
    """The module `python -m` runs (e.g. "bench.speed"), or None when a file was run. Under -m, sys.argv[0] is the
    module's file path, so the name comes from __main__'s spec."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None and spec.name else None


def command_line() -> str:
    """The command that ran this process, as typed: `python -m bench.speed ARGS`."""
    module = main_module()
    program = ["-m", module] if module else sys.argv[:1]
    return " ".join([Path(sys.executable).name, *program, *sys.argv[1:]])


def argument_parser(doc: str, python: str = "python") -> argparse.ArgumentParser:
    """A script's parser: its usage line reads `python -m bench.<name>`, its description is the first line of the
    script's docstring `doc`. `python` names the interpreter in that line (kvpress_ref runs in its own venv)."""
    module = main_module()
    return argparse.ArgumentParser(prog=f"{python} -m {module}" if module else None, description=doc.splitlines()[0])


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2) + "\n")
    return path


def data_file(name: str, override: str | None) -> Path:
    path = Path(override) if override else DATA / name
    if not path.is_file():
        sys.exit(f"error: {path} not found (pass --text FILE)")
    return path


def calibrated(source, calib_tokens: int = 3072):
    """A sampled calibration of SmolLM2 (`source`: load_any("smollm2")): calib_tokens in 256-token sequences plus 512
    held out, free text only (`kvconvert convert` also samples chats and adds long rows: pipeline.calibration_tokens,
    bench.studies.long_calibration). Returns (Compressor, held-out tokens)."""
    from kvconvert.convert.build import Compressor
    from kvconvert.convert.calibrate import collect_inputs, sample_tokens

    tokens = sample_tokens(source.model, source.tokenizer, calib_tokens + 512, 256)
    return Compressor(source.model, "llama", "smollm2", collect_inputs(source.model, tokens[:-2])), tokens[-2:]


def planned(source, ratio: float):
    """`source` (load_source("smollm2")) calibrated and planned as `kvconvert convert SRC OUT --kv-ratio ratio
    --judge-dtype float32` does (the studies that use it were recorded so): a namespace of base (the identity
    config), ov (the overrides), heldout, cal, comp (its Compressor), probe (the recall probe) and report (the
    planner's PlanReport)."""
    from types import SimpleNamespace

    import kvconvert.convert.pipeline as pipeline
    import kvconvert.convert.plan as planning
    from kvconvert.convert.build import Compressor
    from kvconvert.convert.calibrate import collect_inputs
    from kvconvert.convert.identity import identity_config

    opts = pipeline.ConvertOptions(kv_ratio=ratio)
    base = identity_config(source.model.config, source.model_type, "smollm2")
    ov = planning.fit_target(base, pipeline.check_overrides_against(base, opts))
    calib, heldout, _, stream, lead = pipeline.calibration_tokens(source, opts)
    long = pipeline.long_calibration(source, stream, lead, opts)
    cal = collect_inputs(source.model, calib, long=long)
    comp = Compressor(source.model, source.model_type, "smollm2", cal)
    probe = pipeline.recall_probe(source, stream, lead, opts)
    report = planning.choose_plan(comp, ratio, ov, heldout, probe=probe)  # (without --top-up or --refit, the default)
    return SimpleNamespace(base=base, ov=ov, heldout=heldout, cal=cal, comp=comp, probe=probe, report=report)


def policy_presets(args) -> tuple[list[float], list[int], int]:
    """(budgets, passkey lengths, passkey trials) of the cache-policy benchmarks (zsmerge, kvpress_ref) from their
    --budgets, --passkey ('none': no passkey) and --passkey-trials, else from the --cpu preset (5% and 25%; 2k x 10)
    or the GPU one (5%, 10% and 25%; 2k, 4k and 8k x 50)."""
    budgets = [float(b) for b in (args.budgets or ("0.05,0.25" if args.cpu else "0.05,0.10,0.25")).split(",")]
    spec = args.passkey or ("2048" if args.cpu else "2048,4096,8000")
    lengths = [] if spec == "none" else [int(n) for n in spec.split(",") if n]
    trials = args.passkey_trials or (10 if args.cpu else 50)
    return budgets, lengths, trials


def parse_policy(spec: str) -> tuple[str, dict]:
    """A policy with its knobs, as `kvconvert eval`'s --kv-* options, knobs after a colon, separated by ':' or ',':
    "zsmerge:score=reconstruct,recent=0.1" -> ("zsmerge", {"score": "reconstruct", "recent": 0.1})."""
    import re

    name, _, knobs = spec.partition(":")
    kw = {}
    for part in filter(None, re.split("[:,]", knobs)):
        k, v = part.split("=", 1)
        kw[k] = v if k == "score" else float(v)
    return name, kw


def suite_presets(args, gpu: bool) -> tuple[list[float], list[int], list[str], int, list[str] | None, str]:
    """(budgets, lengths, tasks, trials, haystack sentences, haystack name) of the policy benchmarks on the
    long-context suite (long_policies, kvpress_ref --suite), from their --budgets, --lengths, --tasks, --trials and
    --text ('generated': the built-in haystack, sentences None), else the CPU preset (25% and 10%; 2k; single and
    multi-key; 6 trials; Northanger Abbey) or the GPU one (25%, 10% and 5%; 2k and 4k; every task; 20 trials)."""
    from kvconvert.evaluate import read_text
    from kvconvert.longcontext import TASKS, text_sentences

    budgets = [float(b) for b in (args.budgets or ("0.25,0.1,0.05" if gpu else "0.25,0.1")).split(",")]
    lengths = [int(n) for n in (args.lengths or ("2048,4096" if gpu else "2048")).split(",")]
    tasks = (args.tasks or (",".join(TASKS) if gpu else "single,multikey")).split(",")
    trials = args.trials or (20 if gpu else 6)
    if args.text == "generated":
        return budgets, lengths, tasks, trials, None, "generated"
    haystack = args.text or "austen_northangerabbey.txt"
    return budgets, lengths, tasks, trials, text_sentences(read_text(data_file("austen_northangerabbey.txt", args.text))), haystack


LONG_TASKS = ["single", "multikey", "multivalue", "variables"]


def long_suite(model, tokenizer, length: int, trials: int, reference: list[dict] | None = None,
               haystack: str = "austen_northangerabbey.txt", tasks: list[str] | None = None) -> list[dict]:
    """The long-context suite at `length` tokens (kvconvert eval --long's): every task, `trials` trials, on
    Northanger Abbey's prose; a CLLA model answers through the runtime, as it is served. With `reference` (the
    source's rows) each row is paired against it (share of its accuracy, wins, losses, McNemar p)."""
    from kvconvert.evaluate import read_text, runtime_generator
    from kvconvert.longcontext import compare_suites, run_suite, text_sentences

    sentences = text_sentences(read_text(data_file(haystack, None)))
    clla = getattr(model.config, "model_type", "") == "clla"
    generate = runtime_generator(model, lambda: None) if clla else None
    rows = run_suite(model, tokenizer, tasks or LONG_TASKS, [length], trials, sentences=sentences, generate=generate)
    return compare_suites(rows, reference) if reference is not None else rows
