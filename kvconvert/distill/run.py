"""Distillation as `convert --distill-tokens` (`convert_and_distill`) and `distill` (`distill_folder`) run it:
checkpoint folder, data, training, export.

The checkpoint folder (default: OUT.distill beside OUT) holds everything a resumed run needs, the student before
training included, so `--resume` skips the conversion. OUT itself is only written at the end, atomically;
the checkpoint folder is removed once OUT is written (unless `keep_checkpoints`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file

from ..errors import KvconvertError
from . import data as training_data
from . import dist
from .train import DistillOptions, DistillResult, check_distill_options, check_resumable, resolve_lengths, train

if TYPE_CHECKING:
    from ..convert.pipeline import ConvertOptions

Log = Callable[[str], None]


def checkpoint_dir(out: Path, given: Path | None) -> Path:
    return Path(given) if given is not None else out.with_name(out.name + ".distill")


def prepare_checkpoint_dir(ckpt: Path, resume: bool, force: bool) -> None:
    """Refuse to resume from nothing, and to start over on top of an earlier run's checkpoint without --force."""
    has_run = (ckpt / "initial" / "config.json").is_file()
    if resume and not has_run:
        raise KvconvertError(f"--resume: no checkpoint in {ckpt} (give --checkpoint-dir if it is elsewhere)")
    if not resume and ckpt.exists():
        if not force:
            raise KvconvertError(
                f"{ckpt}: holds a checkpoint of an earlier run; add --resume to continue it, or --force to start over"
            )
        shutil.rmtree(ckpt)
    if ckpt.exists() and not ckpt.is_dir():
        raise KvconvertError(f"{ckpt}: exists and is not a folder")


def save_initial(ckpt: Path, student, record: dict) -> None:
    """The student before training (fp32 safetensors + config) and its conversion record, written atomically."""
    tmp, final = ckpt / "initial.tmp", ckpt / "initial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.to(torch.float32).save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(final)


def load_initial(ckpt: Path):
    """(student, conversion record) as `save_initial` wrote them."""
    from ..loading import load_clla

    student = load_clla(ckpt / "initial").model
    return student, json.loads((ckpt / "initial" / "conversion.json").read_text())


def make_data(teacher, tokenizer, opts: DistillOptions, ckpt: Path, world: dist.World, progress) -> training_data.TrainingData:
    """The run's training and validation sequences; what the teacher writes for them (text, conversations, answers)
    it samples in opts.sample_dtype (convert/precision.py: auto is bfloat16 where the hardware has it natively)."""
    from ..convert.precision import forwards_in, judge_dtype

    device = torch.device(world.device)
    with forwards_in(judge_dtype(opts.sample_dtype, device), device):
        return _make_data(teacher, tokenizer, opts, ckpt, world, progress)


def _make_data(teacher, tokenizer, opts: DistillOptions, ckpt: Path, world: dist.World, progress) -> training_data.TrainingData:
    val_seqs = -(-opts.val_tokens // opts.seq_len)
    needed = opts.steps(world) * opts.global_batch(world)
    pool = max(opts.global_batch(world), min(needed, -(-opts.sample_tokens // opts.seq_len)))
    if opts.data:
        return training_data.from_files(
            tokenizer, opts.data, opts.seq_len, val_seqs, opts.global_batch(world), opts.seed, teacher, chat_seqs=pool,
            progress=progress, train_seqs=needed, cache_dir=ckpt / "samples", world=world)
    return training_data.sampled(
        teacher, tokenizer, pool, val_seqs, opts.seq_len, opts.seed, ckpt / "samples", world,
        chunk_seqs=256 if world.device.startswith("cuda") else 32,
        progress=lambda d, n: progress("sampling training text from the teacher", d, n),
    )


def distill_student(
    student,
    record: dict,
    teacher,
    tokenizer,
    teacher_name: str,
    opts: DistillOptions,
    ckpt: Path,
    world: dist.World,
    resume: bool,
    log: Log,
    progress: Callable,
    step_progress: Callable,
) -> tuple[object, DistillResult]:
    """Save the initial student (unless resuming), train from the checkpoint folder, return the best student."""
    opts = resolve_lengths(opts, getattr(teacher.config, "max_position_embeddings", None), world.device)
    check_distill_options(opts, world)
    if resume:
        check_resumable(ckpt, opts.fingerprint(world, teacher_name))  # before any sampling or loading
    else:
        if world.is_main:
            save_initial(ckpt, student, record)
        dist.barrier(world)
    # Every process starts from the same saved weights, and a resumed run from exactly what the first run saw.
    student, _ = load_initial(ckpt)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise KvconvertError(
            f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the student's ({student.config.vocab_size})"
        )
    teacher.to(world.device, torch.bfloat16 if world.device.startswith("cuda") else torch.float32)
    data = make_data(teacher, tokenizer, opts, ckpt, world, progress)
    log(f"distilling on {data.origin}; {opts.steps(world):,} steps of {opts.global_batch(world)} × {opts.seq_len} tokens"
        f" on {world.device}" + (f" × {world.size} processes" if world.distributed else ""))
    result = train(student, teacher, data, opts, ckpt, world, teacher_name, resume, log, step_progress)
    dist.barrier(world)
    if not world.is_main:
        return None, result
    # The export starts from the saved initial student (whole, whatever the sharding) with the best weights put in.
    student, _ = load_initial(ckpt)
    if result.best_path is not None:
        with torch.no_grad():
            params = dict(student.named_parameters())
            for n, t in load_file(str(result.best_path)).items():
                params[n].copy_(t)
    best = result.best
    log(f"best validation at step {best['step']:,}: KL {best['kl']:.4f}, top-1 {best['top1']:.1%}, ppl {best['ppl']:.3f};"
        f" {result.tokens_per_s:,.0f} training tokens/s")
    return student, result


def distill_folder(
    model_path: Path,
    teacher_path: str,
    opts: DistillOptions,
    out: Path | None = None,
    ckpt_given: Path | None = None,
    resume: bool = False,
    force: bool = False,
    keep_checkpoints: bool = False,
    log: Log = lambda m: None,
    progress: Callable = lambda what, d, n: None,
    step_progress: Callable = lambda s, n, m: None,
) -> dict:
    """`kvconvert distill MODEL --teacher SRC`: continue training a converted model; the result replaces MODEL
    (or goes to `out`), atomically. Returns the updated conversion record."""
    from ..convert.export import atomic_folder, check_output, conversion_record, write_conversion_json, write_model
    from ..loading import is_clla_folder, load_any, load_clla

    model_path = Path(model_path)
    if not is_clla_folder(model_path):
        raise KvconvertError(f"{model_path}: not a kvconvert CLLA model folder (convert it first: kvconvert convert SRC OUT)")
    out = Path(out) if out is not None else model_path
    in_place = out.resolve() == model_path.resolve()
    if not in_place:
        check_output(out, force)
    ckpt = checkpoint_dir(out, ckpt_given)
    world = dist.init(opts.device)
    check_distill_options(opts, world)
    if opts.data:
        from ..convert.calibrate import read_data_files

        read_data_files(opts.data)
    if world.is_main:
        prepare_checkpoint_dir(ckpt, resume, force)
    dist.barrier(world)
    log(f"loading {model_path}")
    loaded = load_clla(model_path)
    log(f"loading the teacher {teacher_path}")
    teacher = load_any(teacher_path)
    record_path = model_path / "conversion.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    student, result = distill_student(
        loaded.model, record, teacher.model, loaded.tokenizer or teacher.tokenizer, teacher.name, opts, ckpt, world,
        resume, log, progress, step_progress,
    )
    if not world.is_main:
        return record
    from ..convert.source import read_folder_config

    stored = read_folder_config(model_path)
    dtype = getattr(torch, str(stored.get("dtype") or stored.get("torch_dtype") or "float32"), torch.float32)
    record["distill"] = list(record.get("distill", [])) + [result.record(opts) | {"teacher": teacher.name}]
    with atomic_folder(out, force=True if in_place else force) as tmp:
        log(f"writing {out}")
        write_model(tmp, student, loaded.tokenizer, loaded.generation_config, dtype)
        record = conversion_record(student.config, record)
        write_conversion_json(tmp, record)
    if not keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return record


def convert_and_distill(
    src: str | Path,
    out: Path,
    opts: ConvertOptions,
    distill: DistillOptions | None,
    resume: bool = False,
    ckpt_given: Path | None = None,
    keep_checkpoints: bool = False,
    step_progress: Callable = lambda s, n, m: None,
) -> dict:
    """`kvconvert convert --distill-tokens`: the conversion's stages (`opts`: ConvertOptions) with a distillation
    from the source between the build and the export; `resume` takes the student from the checkpoint folder instead
    of converting. Under torchrun, process 0 converts and exports; every process trains (the others return the
    summary without writing OUT). Returns the conversion record."""
    from ..convert.calibrate import read_data_files
    from ..convert.pipeline import Conversion, check_options
    from ..convert.source import load_source

    check_options(opts)
    if distill is None:
        raise KvconvertError("--resume continues a distillation: give the same --distill-tokens as the interrupted run")
    if opts.identity:
        raise KvconvertError("--identity is already exact; there is nothing to distill")
    job = Conversion.start(src, out, opts, plan_checks=not resume)
    ckpt = checkpoint_dir(job.out, ckpt_given)
    distill = replace(distill, sample_dtype=opts.judge_dtype)  # the teacher samples as the conversion does
    world = dist.init(distill.device)
    check_distill_options(distill, world)
    if distill.data:
        read_data_files(distill.data)
    if world.is_main:
        prepare_checkpoint_dir(ckpt, resume, opts.force)
    dist.barrier(world)
    source = job.load_source()
    model, summary = None, {}
    if resume:
        model, summary = load_initial(ckpt)
        job.timings = summary.get("timings_s", {}) | job.timings
        summary = job.stamp(summary)
        opts.log(f"resuming the distillation in {ckpt} (the conversion is not redone)")
    elif world.is_main:
        model, summary = job.build()
    else:
        summary = job.stamp(summary)
    t = time.perf_counter()
    model, result = distill_student(
        model, summary, source.model, source.tokenizer, job.ref.name, distill, ckpt, world, resume, opts.log,
        opts.progress, step_progress,
    )
    if world.is_main and (distill.fsdp or world.device != "cpu"):
        job.source = load_source(job.ref, dtype=torch.float32)  # the teacher was sharded or cast to bf16 for training
    job.timings["distill"] = round(time.perf_counter() - t, 3)
    summary["distill"] = [result.record(distill)]
    if not world.is_main:
        return summary
    record = job.export(model, summary)
    if not keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return record
