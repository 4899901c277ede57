"""Options more than one command takes, each written once.

Typer reads a command's options from its signature, so a shared option is an `Annotated` alias, and a shared block
of options is a dataclass whose fields are such aliases: `option_groups` puts the fields in the signature of each
command that names the dataclass, and calls the command with them gathered into one instance. A new knob of a
block is then one field here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..distill.train import DistillOptions
from ..errors import KvconvertError

DISTILL = "Distillation"
RUNTIME = "Runtime"
POLICY = "Cache policy"


def option_groups(**groups: type):
    """Decorator: each parameter named in `groups` (`kv=PolicyOptions`) stands for that dataclass's fields, which
    the command's signature lists in its place as options (their annotations and defaults); the command is called
    with them gathered into one instance under the parameter's name."""

    def decorate(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        params = []
        for p in inspect.signature(fn).parameters.values():
            if p.name not in groups:
                params.append(p.replace(annotation=hints.get(p.name, p.annotation)))
                continue
            fields = typing.get_type_hints(groups[p.name], include_extras=True)
            params += [inspect.Parameter(f.name, p.kind, annotation=fields[f.name], default=f.default)
                       for f in dataclasses.fields(groups[p.name])]
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{fn.__name__}: an option group's field repeats a parameter name")

        @functools.wraps(fn)
        def command(*args, **kwargs):
            for name, group in groups.items():
                given = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(group) if f.name in kwargs}
                kwargs.setdefault(name, group(**given))
            return fn(*args, **kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


def json_option(help: str):
    return Annotated[bool, typer.Option("--json", help=help)]


def force_option(help: str):
    return Annotated[bool, typer.Option("--force", help=help)]


AsJson = json_option("Print results as JSON.")
Threads = Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")]

# ----------------------------------------------------------------------------------------------- runtime
AnyModel = Annotated[str, typer.Argument(metavar="MODEL", help="A converted folder or any source (folder, .gguf, 'smollm2').")]
RuntimeModel = Annotated[str, typer.Argument(metavar="MODEL", help="A converted folder or any source (folder, .gguf, 'smollm2'; run through an identity conversion).")]
RuntimeDevice = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.", rich_help_panel=RUNTIME)]
RuntimeDtype = Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.", rich_help_panel=RUNTIME)]
CudaGraphs = Annotated[bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay the decode step as a CUDA graph (CUDA only).", rich_help_panel=RUNTIME)]
RuntimeThreads = Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).", rich_help_panel=RUNTIME)]

# ----------------------------------------------------------------------------------------------- cache policy
KvPolicy = Annotated[Optional[str], typer.Option("--kv-policy", help="Token-budget cache policy: zsmerge (heavy hitters + recent + merged residual slots), h2o, streaming (sinks + recent), or full (the runtime without a policy).", rich_help_panel=POLICY)]
DEFAULT_BUDGET = 0.05  # --kv-budget under a policy, when not given
KvBudget = Annotated[Optional[float], typer.Option("--kv-budget", help=f"Tokens each layer group keeps per sequence: a share of the context (< 1) or a count (>= 1, below the context); {DEFAULT_BUDGET:g} when a policy is given without it.", rich_help_panel=POLICY, show_default=False)]
KvRecent = Annotated[Optional[float], typer.Option("--kv-recent", help="Share of the budget kept as the most recent tokens (default: the policy's; zsmerge/h2o 0.5).", rich_help_panel=POLICY, show_default=False)]
KvResidual = Annotated[Optional[float], typer.Option("--kv-residual", help="zsmerge: share of the non-recent budget kept as merge slots (default 0.02, at least one slot).", rich_help_panel=POLICY, show_default=False)]
KvDecay = Annotated[Optional[float], typer.Option("--kv-decay", help="Per-step decay of accumulated attention (default: zsmerge 0.98, h2o 1).", rich_help_panel=POLICY, show_default=False)]
KvQueries = Annotated[Optional[int], typer.Option("--kv-queries", help="zsmerge/h2o: the prompt's last queries whose (decayed) attention scores the prompt (default 512). Few (e.g. 8): the prompt's closing words, such as a question, choose what is kept.", rich_help_panel=POLICY, show_default=False)]
KvScore = Annotated[Optional[str], typer.Option("--kv-score", help="zsmerge/h2o, eval only: how a prompt compressed at once is scored: attention (default; its last queries' attention) or reconstruct (the attention each token gets while the model reads the prompt again; query-agnostic, costs about one more prefill).", rich_help_panel=POLICY, show_default=False)]


@dataclass
class PolicyOptions:
    """The --kv-* options: a token-budget cache policy for the runtime (kvconvert.runtime.policies.make_policy).
    Field names are the keys of the `kv_policy` entry that `eval --json` prints."""

    policy: KvPolicy = None
    budget: KvBudget = None  # None: DEFAULT_BUDGET under a policy
    recent: KvRecent = None
    residual: KvResidual = None
    decay: KvDecay = None
    queries: KvQueries = None
    score: KvScore = None

    def __post_init__(self):
        # the options without a policy (or with full, which keeps every token) would be ignored: refuse them
        given = [f"--kv-{k}" for k in self.settings() if getattr(self, k) is not None]
        if given and self.policy in (None, "full"):
            what = "--kv-policy full keeps every token" if self.policy == "full" else "no --kv-policy was given"
            raise KvconvertError(f"{given[0]} applies to a token-budget policy (zsmerge, h2o, streaming), and {what}")
        if self.policy not in (None, "full") and self.budget is None:
            self.budget = DEFAULT_BUDGET

    @classmethod
    def settings(cls) -> list[str]:
        """The fields after `policy` (make_policy's keywords): each a --kv-NAME option that needs a policy."""
        return [f.name for f in dataclasses.fields(cls)][1:]

    def make(self):
        """A fresh policy object (policies hold per-sequence state); None without --kv-policy or with full."""
        from ..runtime.policies import make_policy

        if self.policy is None:
            return None
        return make_policy(self.policy, **{k: getattr(self, k) for k in self.settings()})

    def check(self, context: int | None = None) -> None:
        """Refuse bad options before anything is loaded; `context`: the most tokens a sequence will hold, which a
        budget of tokens must stay below (else the policy evicts nothing)."""
        if self.make() is not None and context is not None:
            check_budget(self.budget, context)


def check_budget(budget: float, context: int) -> None:
    """Refuse a token-count budget that is not below the context: the policy would keep every token."""
    if budget >= 1 and budget >= context:
        raise KvconvertError(f"--kv-budget {budget:g} tokens is not below the context ({context:,} tokens): nothing "
                             f"would be evicted; give fewer tokens or a share of the context (< 1)")


# ----------------------------------------------------------------------------------------------- distillation
DISTILL_DEFAULTS = DistillOptions(tokens=0)  # the one place the defaults live: the options read them from here
DistillTokens = Annotated[int, typer.Option(help="Training tokens (all processes together).", rich_help_panel=DISTILL)]
SeqLen = Annotated[int, typer.Option(help="Tokens per training sequence (0: the model's positions, at most 4,096). Past 512, a share of the sequences are recall and long-context task rows, made from the teacher's samples or from --data text (not from conversations).", rich_help_panel=DISTILL)]
BatchSize = Annotated[int, typer.Option(help="Sequences per micro-batch per process (0: 16,384 tokens' worth on GPU, 4,096 on CPU).", rich_help_panel=DISTILL)]
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
TrainDevice = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda; under torchrun each process takes its local GPU.", rich_help_panel=DISTILL)]
GradCkpt = Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute activations in backward (default: on CPU past 2,048 tokens a micro-batch; on GPU only where a step would not fit the device without it; always under --fsdp).", rich_help_panel=DISTILL, show_default=False)]
CkptDir = Annotated[Optional[Path], typer.Option(help="Checkpoint folder (default: OUT.distill beside OUT).", rich_help_panel=DISTILL)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run saved in the checkpoint folder.", rich_help_panel=DISTILL)]
KeepCkpt = Annotated[bool, typer.Option("--keep-checkpoints", help="Keep the checkpoint folder after export.", rich_help_panel=DISTILL)]
Fsdp = Annotated[bool, typer.Option("--fsdp", help="Under torchrun: shard student and teacher (FSDP2) instead of replicating them (DDP).", rich_help_panel=DISTILL)]


@dataclass
class DistillFlags:
    """The distillation options `convert` and `distill` share: the training (fields of DistillOptions) and the
    checkpoint folder."""

    seq_len: SeqLen = DISTILL_DEFAULTS.seq_len
    batch_size: BatchSize = DISTILL_DEFAULTS.batch_size
    grad_accum: GradAccum = DISTILL_DEFAULTS.grad_accum
    lr: Lr = DISTILL_DEFAULTS.lr
    warmup: Warmup = DISTILL_DEFAULTS.warmup
    temperature: Temperature = DISTILL_DEFAULTS.temperature
    hidden_weight: HiddenWeight = DISTILL_DEFAULTS.hidden_weight
    train: TrainSet = DISTILL_DEFAULTS.train
    eval_every: EvalEvery = DISTILL_DEFAULTS.eval_every
    save_every: SaveEvery = DISTILL_DEFAULTS.save_every
    val_tokens: ValTokens = DISTILL_DEFAULTS.val_tokens
    sample_tokens: SampleTokens = DISTILL_DEFAULTS.sample_tokens
    device: TrainDevice = DISTILL_DEFAULTS.device
    grad_checkpointing: GradCkpt = DISTILL_DEFAULTS.grad_checkpointing
    checkpoint_dir: CkptDir = None
    resume: Resume = False
    keep_checkpoints: KeepCkpt = False
    fsdp: Fsdp = DISTILL_DEFAULTS.fsdp

    def options(self, tokens: int, data: list[Path] | None, seed: int) -> DistillOptions:
        """The training options: these flags (those DistillOptions has), the tokens, the data and the seed."""
        names = {f.name for f in dataclasses.fields(DistillOptions)}
        given = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        return DistillOptions(**given, tokens=tokens, data=list(data or []), seed=seed)
