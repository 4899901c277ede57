"""The distillation loop: the CLLA student learns the teacher's next-token distributions.

The loss (distill/loss.py): T² · KL(teacher_T ‖ student_T) per token, plus an optional hidden-state term; the
model's forward already applies the cache's quantize/dequantize with a straight-through gradient, so training is
quantization-aware.
AdamW, linear warm-up then cosine decay, gradient clipping and accumulation; bf16 autocast and gradient
checkpointing on GPU, fp32 on CPU; data-parallel under torchrun (DDP). Validation KL every `eval_every`
steps; the best student is what gets exported. Checkpoints every `save_every` steps and on SIGINT/SIGTERM
resume exactly: weights, optimizer, scheduler and the step (the data order is a function of the step).

Checkpoint folder: `initial/` (the student before training, a loadable model folder), `state/` (the
trainable weights now and at the best validation, optimizer + scheduler, progress.json), `samples/`
(data-free sequences). `state/` is replaced atomically: a kill during a save leaves the previous one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import KvconvertError
from . import dist
from .data import TrainingData
from .loss import chunked_kl, hidden_loss, logit_chunk_tokens, model_hidden, validate

# Parameter sets a user can train (names are matched as substrings of CllaForCausalLM parameter names).
# qk-norm sources add the query map (the rope maps folded after the query norm) and the key norms' gains.
LATENT = ("latent_proj.", ".k_up.", ".v_up.", ".rope_up.", ".q_map", ".k_scale.gain")
TRAIN_SETS = {
    "latent": LATENT,  # only what the conversion created: the latent, rope key and up-projections (rope_up too)
    "attention": LATENT + (".q_proj.", ".o_proj.", ".q_norm.", ".k_scale."),  # the whole attention block
    "all": ("",),  # every weight, MLPs, norms and embeddings included (default)
}


DATA_VERSION = 5  # of how training sequences are made (2: long --data text gets recall and task rows; 3: --data
# text gets the teacher's conversations for an instruct teacher; 4: --data text and those conversations sized to
# what a run reads, long rows included; 5: the teacher samples in bfloat16 where the hardware has native bfloat16,
# convert/precision.py); resumes check it


@dataclass
class DistillOptions:
    tokens: int  # training tokens seen by the student, all processes together
    seq_len: int = 0  # 0: the model's positions, at most LONG_SEQ_LEN (resolve_lengths)
    batch_size: int = 0  # sequences per micro-batch per process; 0: MICRO_BATCH_TOKENS of the device's worth
    grad_accum: int = 1
    lr: float = 2e-3  # relative: each step moves a weight tensor by about lr × its RMS (see make_optimizer)
    warmup: float = 0.05  # share of the steps with a linear warm-up
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × this
    weight_decay: float = 0.0
    clip: float = 1.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    train: str = "all"  # measured best at equal tokens (README: distillation); attention or latent save optimizer memory
    eval_every: int = 50
    save_every: int = 200
    val_tokens: int = 16384
    sample_tokens: int = 1_000_000  # data-free: size of the sampled pool (cycled when tokens exceed it)
    data: list[Path] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    grad_checkpointing: bool | None = None  # None: on for GPU, and on CPU past CPU_CHECKPOINT_TOKENS a micro-batch
    fsdp: bool = False  # shard student and teacher over the torchrun processes (FSDP2) instead of replicating (DDP)
    logit_chunk: int | None = None  # tokens whose full-vocabulary logits exist at once (None: by device; 0: all)
    sample_dtype: str = "auto"  # what the teacher writes, it samples in: convert/precision.py (convert's --judge-dtype)

    def fingerprint(self, world: dist.World, teacher: str) -> dict:
        """What a resumed run must share with the interrupted one to continue it exactly (not sample_dtype: what the
        teacher sampled is saved in the checkpoint folder and read back, never sampled again)."""
        keep = ("tokens", "seq_len", "batch_size", "grad_accum", "lr", "warmup", "min_lr_ratio", "weight_decay",
                "clip", "temperature", "hidden_weight", "train", "val_tokens", "sample_tokens", "seed", "fsdp")
        d = {k: getattr(self, k) for k in keep}
        return d | {"data": [str(Path(p).resolve()) for p in self.data], "world_size": world.size, "teacher": teacher,
                    "data_version": DATA_VERSION}

    def global_batch(self, world: dist.World) -> int:
        return self.batch_size * self.grad_accum * world.size

    def steps(self, world: dist.World) -> int:
        return self.tokens // (self.global_batch(world) * self.seq_len)


LONG_SEQ_LEN = 4096  # default training sequence: as long as the model takes, up to this
MICRO_BATCH_TOKENS = {"cuda": 16384, "cpu": 4096}  # default tokens of a micro-batch (--batch-size 0)


def resolve_lengths(o: DistillOptions, positions: int | None, device: str) -> DistillOptions:
    """The options with --seq-len 0 and --batch-size 0 made concrete for a model of `positions` on `device`."""
    seq = o.seq_len or min(positions or LONG_SEQ_LEN, LONG_SEQ_LEN)
    batch = o.batch_size or max(1, MICRO_BATCH_TOKENS["cuda" if device.startswith("cuda") else "cpu"] // seq)
    return replace(o, seq_len=seq, batch_size=batch)


def check_distill_options(o: DistillOptions, world: dist.World | None = None) -> None:
    """Refuse out-of-range options before any work starts (--seq-len and --batch-size 0: their defaults)."""
    world = world or dist.World()
    o = resolve_lengths(o, None, world.device)
    if o.train not in TRAIN_SETS:
        raise KvconvertError(f"--train must be one of {', '.join(TRAIN_SETS)}; got {o.train}")
    for name, value in (("--seq-len", o.seq_len), ("--batch-size", o.batch_size), ("--grad-accum", o.grad_accum),
                        ("--eval-every", o.eval_every), ("--save-every", o.save_every)):
        if value < 1:
            raise KvconvertError(f"{name} must be at least 1, got {value}")
    if o.seq_len < 2:
        raise KvconvertError(f"--seq-len must be at least 2, got {o.seq_len}")
    if not (o.lr > 0 and o.temperature > 0 and o.clip > 0 and 0 <= o.warmup < 1 and 0 <= o.min_lr_ratio <= 1
            and o.hidden_weight >= 0 and o.weight_decay >= 0):
        raise KvconvertError("--lr, --temperature and --clip must be positive, --warmup in [0, 1), --hidden-weight >= 0")
    if o.val_tokens < o.seq_len * world.size:
        raise KvconvertError(
            f"--val-tokens ({o.val_tokens}) must be at least one sequence (--seq-len {o.seq_len}) per process"
        )
    if o.fsdp and not world.distributed:
        raise KvconvertError("--fsdp shards over processes: launch with torchrun --nproc-per-node P -m kvconvert ...")
    per_step = o.global_batch(world) * o.seq_len
    if o.steps(world) < 1:
        raise KvconvertError(
            f"--tokens {o.tokens:,} is less than one optimizer step ({per_step:,} tokens = --batch-size × --grad-accum"
            f" × processes × --seq-len)"
        )
    if o.device not in ("auto", "cpu", "cuda"):
        raise KvconvertError(f"--device must be auto, cpu or cuda; got {o.device}")
    if o.device == "cuda" and not torch.cuda.is_available():
        raise KvconvertError("--device cuda: no CUDA device is available")


def trainable_names(model, which: str) -> list[str]:
    """Parameters of the chosen set. A key bias never trains (unless key norms scale it per position, qk_norm): it
    adds q·b to every score of a query alike, which softmax ignores, so its gradient is zero up to rounding and Adam
    would turn that rounding noise into steps."""
    frozen_bias = not getattr(model.config, "qk_norm", False)
    return [n for n, _ in model.named_parameters()
            if any(p in n for p in TRAIN_SETS[which]) and not (frozen_bias and n.endswith("k_up.bias"))]


def make_optimizer(student, names: list[str], rms: dict[str, float], opts: DistillOptions) -> torch.optim.AdamW:
    """AdamW with one parameter group per tensor and a learning rate relative to the tensor's RMS.

    A conversion leaves weights of very different scales (a latent down-projection with RMS ~40 beside a value
    up-projection with RMS ~1e-3 in SmolLM2 at 0.05: the factorization fixes only their product), and Adam's
    step is about `lr` in absolute terms whatever the weight's size, so one absolute rate either blows up the
    small tensors or freezes the large ones. `opts.lr` is therefore the step size as a share of each tensor's
    RMS (as in Adafactor's relative step); weight decay only on matrices. The update is torch's fused kernel, one
    launch per tensor: with a group per tensor, the default implementation runs each elementwise op of the update
    tensor by tensor (5.5 s a step for SmolLM2's 132M weights on this CPU beside another job, against 0.29 s fused),
    and on a GPU hundreds of small launches. Not under FSDP (sharded tensors take the default path).
    """
    params = dict(student.named_parameters())
    groups = []
    for n in names:
        p = params[n]
        groups.append({"params": [p], "lr": opts.lr * (rms[n] or 1.0), "weight_decay": opts.weight_decay if p.ndim >= 2 else 0.0})
    return torch.optim.AdamW(groups, lr=opts.lr, betas=(0.9, 0.95), eps=1e-12, fused=None if opts.fsdp else True)


def lr_factor(step: int, steps: int, warmup: float, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear warm-up, cosine decay."""
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def shard(model, layers) -> None:
    """FSDP2: each decoder layer is one unit (parameters gathered for its forward/backward), the rest the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def full_params(student, names: set[str], fsdp: bool) -> dict[str, torch.Tensor]:
    """The named parameters, whole, in fp32 on the CPU. Under FSDP a collective: every process calls it, process 0
    gets the tensors (the others an empty dict)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: t.float().clone() for n, t in sd.items() if n in names}
    return {n: p.detach().float().cpu().clone() for n, p in student.named_parameters() if n in names}


def optimizer_state(student, optimizer, fsdp: bool) -> dict:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(student, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(student, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


class StopRequested:
    """SIGINT/SIGTERM set a flag the loop reads after each step (a second signal stops at once)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever owns them
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(KvconvertError):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class DistillResult:
    steps: int
    tokens: int
    seconds: float
    best: dict  # {"step", "kl", "top1", "ppl"}
    history: list[dict]  # train loss per step and validation rows
    data_origin: str
    device: str
    tokens_per_s: float = 0.0  # this session's training throughput (validation excluded)
    best_path: Path | None = None  # the best trainable weights (process 0); None: none beat the initial weights
    options: DistillOptions | None = None  # as trained: sequence length and batch size resolved
    grad_checkpointing: bool | None = None  # whether the student's activations were recomputed in backward

    def record(self, opts: DistillOptions) -> dict:
        o = {k: (list(map(str, v)) if k == "data" else v) for k, v in asdict(self.options or opts).items()}
        return {"options": o, "steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 1),
                "device": self.device, "data": self.data_origin, "best": self.best,
                "tokens_per_s": round(self.tokens_per_s, 1), "grad_checkpointing": self.grad_checkpointing,
                "validation": [h for h in self.history if "val_kl" in h]}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


BEST = "best.safetensors"  # the best trainable weights so far: in the checkpoint folder, and in each saved state/


def save_best(ckpt: Path, best: dict[str, torch.Tensor]) -> Path:
    """Write the best trainable weights to ckpt/BEST atomically. They live on disk, not in memory: a copy of the
    trainable weights held for the whole run was a fifth of a CPU run's memory."""
    path, tmp = ckpt / BEST, ckpt / f".{BEST}.tmp"
    save_file({n: t.contiguous() for n, t in best.items()}, str(tmp))
    tmp.replace(path)
    return path


def restore_best(ckpt: Path) -> Path | None:
    """On resume: ckpt/BEST becomes the saved state's best (the best as of the saved step; a run killed later may
    have written a newer one, which the resumed run will meet again). None where the state has none."""
    saved = ckpt / "state" / BEST
    if not saved.is_file():
        return None
    tmp = ckpt / f".{BEST}.tmp"
    shutil.copyfile(saved, tmp)
    tmp.replace(ckpt / BEST)
    return ckpt / BEST


def save_state(ckpt: Path, current: dict, optim: dict, progress: dict) -> None:
    """Write `state/` atomically: into state.tmp/, then swap. Its best weights are ckpt/BEST as it is now (a hard
    link where the file system allows: a later best replaces ckpt/BEST by a new file and leaves this one)."""
    tmp, final, old = ckpt / "state.tmp", ckpt / "state", ckpt / "state.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in current.items()}, str(tmp / "trainable.safetensors"))
    if (ckpt / BEST).is_file():
        try:
            os.link(ckpt / BEST, tmp / BEST)
        except OSError:
            shutil.copyfile(ckpt / BEST, tmp / BEST)
    torch.save(optim, tmp / "optim.pt")
    (tmp / "progress.json").write_text(json.dumps(progress, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def check_resumable(ckpt: Path, fingerprint: dict) -> dict | None:
    """The saved progress (None before the first save), refusing a resume with options that change the run."""
    path = ckpt / "state" / "progress.json"
    if not path.is_file():
        return None
    prog = json.loads(path.read_text())
    if prog["fingerprint"] != fingerprint:
        diff = sorted(k for k in fingerprint if prog["fingerprint"].get(k) != fingerprint[k])
        raise KvconvertError(
            f"{ckpt}: the checkpoint was made with other options ({', '.join(diff)}); resume with the same ones"
        )
    return prog


CPU_CHECKPOINT_TOKENS = 2048  # tokens per micro-batch above which a CPU run recomputes activations by default


def uses_grad_checkpointing(opts: DistillOptions, device: torch.device, fits: Callable[[], bool] | None = None) -> bool:
    """--grad-checkpointing as given; else on CPU once a micro-batch's activations (about 1.4 MB a token for
    SmolLM2-135M in fp32) would outgrow the weights and the optimizer state (host memory is shared, and kept small);
    on GPU unless `fits()` says the step fits the device without it (recomputing costs a quarter of the step), and
    always under FSDP (chosen for memory)."""
    if opts.grad_checkpointing is not None:
        return opts.grad_checkpointing
    if device.type != "cuda":
        return opts.batch_size * opts.seq_len > CPU_CHECKPOINT_TOKENS
    return opts.fsdp or fits is None or not fits()


def saved_activation_bytes(forward: Callable[[], object], model) -> int:
    """Bytes of the tensors autograd keeps for backward during `forward()` (distinct storages, the model's own
    parameters left out): what a training step holds between its forward and its backward. Works on any device."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(saved.values())


STEP_MEMORY_SHARE = 0.85  # of the device's memory a step may plan to use without recomputing activations


def step_fits_without_checkpointing(student, ids: torch.Tensor, autocast, chunk_bytes: int) -> bool:
    """Whether a training step fits the GPU with every activation kept: one forward of the student on a micro-batch,
    its saved activations counted (`saved_activation_bytes`), plus the gradients and AdamW's two moments (float32,
    three times the trainable weights), plus the loss's logit chunks (a few tensors of `chunk_bytes`), against
    STEP_MEMORY_SHARE of the device beside what is allocated already. A forward that runs out of memory answers no."""
    device = ids.device
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad) * 4
    try:
        with autocast():
            acts = saved_activation_bytes(lambda: model_hidden(student, student, ids)[0], student)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False
    torch.cuda.empty_cache()
    need = int(acts * 1.1) + 3 * trainable + 8 * chunk_bytes
    return torch.cuda.memory_allocated(device) + need <= STEP_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory


def _place_models(student, teacher, opts: DistillOptions, world: dist.World, device: torch.device,
                  fits: Callable[[], bool] | None = None):
    """Move both models to the device (the teacher frozen, bf16 on GPU), turn on gradient checkpointing where
    `uses_grad_checkpointing` asks for it, and shard them (FSDP) or wrap the student (DDP). Returns the module a
    training forward goes through."""
    student.to(device).train()
    teacher.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval().requires_grad_(False)
    if uses_grad_checkpointing(opts, device, fits):
        student.model.gradient_checkpointing = True
    if opts.fsdp:
        shard(student, student.model.layers)
        shard(teacher, teacher.model.layers)
    elif world.distributed:
        return torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    return student


class _TrainingRun:
    """One run's models, optimizer, scheduler and progress, and its stages: a training step, a validation, a
    checkpoint. `train` drives them step by step and owns the timing and the signals."""

    def __init__(self, student, teacher, data: TrainingData, opts: DistillOptions, ckpt: Path, world: dist.World,
                 teacher_name: str, resume: bool, log: Callable[[str], None]):
        self.student, self.teacher, self.data, self.opts, self.ckpt, self.world, self.log = (
            student, teacher, data, opts, ckpt, world, log)
        self.device = torch.device(world.device)
        self.autocast = _autocast(self.device)
        self.chunk = logit_chunk_tokens(opts.logit_chunk, student.config.vocab_size, self.device)
        self.steps = opts.steps(world)
        self.fingerprint = opts.fingerprint(world, teacher_name)
        names = trainable_names(student, opts.train)
        self.names = set(names)
        for n, p in student.named_parameters():
            p.requires_grad_(n in self.names)
        self.start, self.history, self.best = 0, [], {"step": None, "kl": math.inf}
        self.best_path: Path | None = None  # none yet: the initial weights
        with torch.no_grad():  # of the initial weights
            rms = {n: p.float().pow(2).mean().sqrt().item() for n, p in student.named_parameters() if n in self.names}
        opt_state = self._restore() if resume else None
        chunk_bytes = 4 * student.config.vocab_size * (self.chunk or opts.batch_size * opts.seq_len)
        fits = lambda: step_fits_without_checkpointing(  # noqa: E731  (asked only on GPU)
            student, data.micro_batch(0, opts.batch_size).to(self.device), self.autocast, chunk_bytes)
        self.model = _place_models(student, teacher, opts, world, self.device, fits)
        self.checkpointing = bool(student.model.gradient_checkpointing)
        log(f"activations {'recomputed in backward' if self.checkpointing else 'kept for backward'}")
        self.params = [p for n, p in student.named_parameters() if n in self.names]  # after sharding: the DTensors
        self.optimizer = make_optimizer(student, names, rms, opts)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps, opts.warmup, opts.min_lr_ratio)
        )
        if opt_state is not None:
            load_optimizer_state(student, self.optimizer, opt_state["optimizer"], opts.fsdp)
            self.scheduler.load_state_dict(opt_state["scheduler"])

    def _restore(self) -> dict | None:
        """Load the saved trainable weights, best weights and progress; return the optimizer + scheduler state
        (None when the interrupted run saved nothing yet)."""
        prog = check_resumable(self.ckpt, self.fingerprint)
        if prog is None:
            self.log("the interrupted run saved no training state yet: starting at step 0")
            return None
        state = self.ckpt / "state"
        current = load_file(str(state / "trainable.safetensors"))
        with torch.no_grad():
            for n, p in self.student.named_parameters():
                if n in self.names:
                    p.copy_(current[n])
        if self.world.is_main:
            self.best_path = restore_best(self.ckpt)
        opt_state = torch.load(state / "optim.pt", weights_only=True, map_location="cpu")
        self.start, self.history, self.best = prog["step"], prog["history"], prog["best"]
        self.log(f"resuming at step {self.start:,} of {self.steps:,}")
        return opt_state

    def _micro_batch(self, step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of micro-batch `m` of optimizer step `step`; gradients are synchronized across
        processes only on the last micro-batch. Returns (loss, kl) of this micro-batch. The KL is made from both
        models' final hidden states, `self.chunk` tokens' logits at a time; every layer's output is kept only for
        the hidden-state loss."""
        A, W, opts = self.opts.grad_accum, self.world.size, self.opts
        layers = opts.hidden_weight > 0
        ids = self.data.micro_batch(step * A * W + m * W + self.world.rank, opts.batch_size).to(self.device)
        with torch.no_grad(), self.autocast():
            t_h, t_layers = model_hidden(self.teacher, self.teacher, ids, layers)
        last = m == A - 1
        if opts.fsdp:
            self.student.set_requires_gradient_sync(last)  # reduce-scatter gradients once per step
        ddp = self.model is not self.student
        with self.model.no_sync() if ddp and not last else contextlib.nullcontext():
            with self.autocast():
                s_h, s_layers = model_hidden(self.model, self.student, ids, layers)
                kl = chunked_kl(s_h, t_h, self.student, self.teacher, opts.temperature, self.chunk)
            h = hidden_loss(s_layers, t_layers) if layers else None
            loss = kl if h is None else kl + opts.hidden_weight * h
            (loss / A).backward()
        return loss.detach(), kl.detach()

    def train_step(self, step: int) -> dict:
        """One optimizer step (0-based `step`) over `grad_accum` micro-batches; returns its history row. The device is
        waited for once, after the whole step is queued (its loss, KL and gradient norm read together), not after
        each micro-batch."""
        A = self.opts.grad_accum
        losses, kls = zip(*(self._micro_batch(step, m) for m in range(A)))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.opts.clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        figures = torch.stack([torch.stack(losses).float().mean(), torch.stack(kls).float().mean(), grad_norm.float()])
        loss_mean, kl_mean, grad_norm = figures.tolist()
        row = {"step": step + 1, "loss": dist.mean(self.world, loss_mean), "kl": dist.mean(self.world, kl_mean),
               "grad_norm": grad_norm, "lr": self.opts.lr * self.scheduler.lr_lambdas[0](step)}
        self.history.append(row)
        return row

    def run_validation(self, step: int) -> None:
        """Validate after `step` steps; keep the trainable weights when they are the best so far."""
        v = validate(self.student, self.teacher, self.data.val, self.opts.batch_size, self.device, self.autocast,
                     self.world, self.data.val_long, self.opts.logit_chunk)
        self.history.append({"step": step, "val_kl": v["kl"], "val_top1": v["top1"], "val_ppl": v["ppl"]}
                            | ({"val_long_kl": v["long_kl"]} if "long_kl" in v else {}))
        if v["kl"] < self.best["kl"]:  # the same decision on every process: the figures are reduced
            self.best = {"step": step} | v
            if self.opts.fsdp or self.world.is_main:  # under FSDP a collective: every process gathers
                best = full_params(self.student, self.names, self.opts.fsdp)
                if self.world.is_main:
                    self.best_path = save_best(self.ckpt, best)
                del best
        far = f", long-range KL {v['long_kl']:.4f}" if "long_kl" in v else ""
        self.log(f"step {step:,}: validation KL {v['kl']:.4f}{far}, top-1 {v['top1']:.1%}, ppl {v['ppl']:.3f}")

    def save_checkpoint(self, step: int) -> None:
        """Save `state/` after `step` steps (gathered by every process, written by process 0)."""
        fsdp = self.opts.fsdp
        current = full_params(self.student, self.names, fsdp)
        optim = {"optimizer": optimizer_state(self.student, self.optimizer, fsdp),
                 "scheduler": self.scheduler.state_dict()}
        if self.world.is_main:
            save_state(self.ckpt, current, optim,
                       {"step": step, "history": self.history, "best": self.best, "fingerprint": self.fingerprint})
        dist.barrier(self.world)


def train(
    student,
    teacher,
    data: TrainingData,
    opts: DistillOptions,
    ckpt: Path,
    world: dist.World,
    teacher_name: str,
    resume: bool = False,
    log: Callable[[str], None] = lambda m: None,
    progress: Callable[[int, int, dict], None] = lambda s, n, m: None,
) -> DistillResult:
    """Distill `teacher` into `student` (trained in place; under FSDP sharded in place). The best validated
    trainable weights are in the file at the result's `best_path` (fp32; on process 0)."""
    run = _TrainingRun(student, teacher, data, opts, ckpt, world, teacher_name, resume, log)
    steps, tokens_per_step = run.steps, opts.global_batch(world) * opts.seq_len
    t0, timed_tokens, train_time = time.perf_counter(), 0, 0.0
    with StopRequested() as stop:
        if run.start == 0 and not any("val_kl" in h for h in run.history):
            run.run_validation(0)  # the zero-shot figure, and the best so far
        for step in range(run.start, steps):
            step_t0 = time.perf_counter()
            row = run.train_step(step)
            timed_tokens += tokens_per_step
            train_time += time.perf_counter() - step_t0
            progress(step + 1, steps, row | {"tokens_per_s": timed_tokens / train_time, "best_kl": run.best["kl"]})
            if (step + 1) % opts.eval_every == 0 or step + 1 == steps:
                run.run_validation(step + 1)
            stopping = dist.any_rank(world, stop.signal is not None)  # every process stops at the same step
            if (step + 1) % opts.save_every == 0 or stopping or step + 1 == steps:
                run.save_checkpoint(step + 1)
            if stopping and step + 1 < steps:
                signum = stop.signal or signal.SIGTERM
                raise Interrupted(
                    f"stopped at step {step + 1:,} of {steps:,} ({signal.Signals(signum).name}); checkpoint saved in"
                    f" {ckpt}; continue with the same command and --resume",
                    signum,
                )
    return DistillResult(steps, steps * tokens_per_step, time.perf_counter() - t0, run.best, run.history, data.origin,
                         str(run.device), timed_tokens / train_time if train_time else 0.0, run.best_path, opts,
                         run.checkpointing)
