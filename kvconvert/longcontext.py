"""Synthetic long-context tasks, generated locally and seeded (the task families of RULER, arXiv 2404.06654).

A trial is a haystack of `length` tokens or a little fewer, with facts ("needles") at seeded depths, then a question
about them. Its answers are strings that the model's greedy continuation must all contain (scored by `passed`).

Tasks:
- `single`: one needle, a 5-digit code for a key; asked for that key.
- `multikey`: needles for several keys (the others are distractors); asked for one key.
- `multivalue`: several codes for one key; asked for all of them.
- `variables`: a chain of assignments (X = 12345, Y = X, Z = Y, ...) among distractor chains; asked which variables
  hold the value.

The haystack is real prose when a text is given (a contiguous run of its sentences from a seeded start; refused if the
text is too short), else sentences made from a seeded word list, so that no data is needed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from .errors import KvconvertError

TASKS = ("single", "multikey", "multivalue", "variables")

_SUBJECTS = ["the river", "an old farmer", "the north road", "a grey cat", "the market", "the small boat", "my aunt",
             "the village choir", "a tall pine", "the morning train", "the baker", "a quiet student", "the harbour",
             "the orchard", "a stray dog", "the lighthouse", "the mill", "our neighbour", "the bell tower", "a sailor"]
_VERBS = ["passed", "watched", "crossed", "followed", "remembered", "painted", "visited", "ignored", "described",
          "circled", "carried", "found", "left", "welcomed", "measured", "warmed", "reached", "lit", "shaded", "kept"]
_OBJECTS = ["the long meadow", "a wooden bridge", "the evening light", "three letters", "the empty square",
            "a basket of apples", "the stone wall", "an open window", "the winter coats", "a narrow lane",
            "the garden gate", "two silver spoons", "the last lantern", "a folded map", "the church steps",
            "a pair of boots", "the wet fields", "the kitchen table", "a blue kettle", "the high hills"]
_TAILS = ["before noon", "in silence", "after the rain", "as usual", "without a word", "for an hour", "at dusk",
          "once again", "with some care", "in the cold", "near the end of the week", "by the fire"]
_KEYS = ["amber", "basalt", "cedar", "dahlia", "ember", "falcon", "garnet", "heron", "indigo", "juniper", "kestrel",
         "lilac", "marble", "nettle", "onyx", "pepper", "quartz", "raven", "saffron", "thistle", "umber", "violet",
         "willow", "yarrow", "zephyr", "acorn", "bramble", "cobalt", "driftwood", "elder"]


@dataclass(frozen=True)
class Trial:
    """One prompt: `context` (haystack with needles) then `question`; `answers` must all appear in the reply.
    `depths`: where each needle sits, as a share of the haystack's sentences (0: start, 1: end)."""

    task: str
    length: int
    seed: int
    context: str
    question: str
    answers: tuple[str, ...]
    depths: tuple[float, ...]

    @property
    def prompt(self) -> str:
        return f"{self.context}\n\n{self.question}"


def found(reply: str, answers: tuple[str, ...]) -> int:
    """How many of the answers occur in the reply as whole words (a code inside a longer number does not count)."""
    return sum(bool(re.search(rf"(?<![\w]){re.escape(a)}(?![\w])", reply)) for a in answers)


def passed(reply: str, answers: tuple[str, ...]) -> bool:
    """Whether every answer occurs in the reply as a whole word."""
    return found(reply, answers) == len(answers)


def text_sentences(text: str) -> list[str]:
    """The sentences of a text, whitespace collapsed (a sentence ends at . ! or ? followed by a space)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def _generated_sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
    return s[0].upper() + s[1:]


def _code(rng: random.Random, used: set[str]) -> str:
    while (code := str(rng.randint(10000, 99999))) in used:
        pass
    used.add(code)
    return code


def _variable(rng: random.Random, used: set[str]) -> str:
    while (name := "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))) in used:
        pass
    used.add(name)
    return name


def _needles(task: str, rng: random.Random, n_keys: int, n_values: int, chain: int) -> tuple[list[str], str, tuple]:
    """(needle sentences, question, answers) of one trial."""
    used: set[str] = set()
    if task == "variables":
        chains = []
        for _ in range(n_keys):  # the first chain is asked about; the others are distractors
            names = [_variable(rng, used) for _ in range(chain)]
            value = _code(rng, used)
            chains.append((names, value))
        needles = [f"VAR {names[0]} = {value}." for names, value in chains]
        needles += [f"VAR {b} = VAR {a}." for names, _ in chains for a, b in zip(names, names[1:])]
        names, value = chains[0]
        question = (f"Which variables hold the value {value} after the assignments above? "
                    f"Answer with their names.\nAnswer: the variables holding {value} are")
        return needles, question, tuple(names)
    keys = rng.sample(_KEYS, n_keys)
    values = {k: [_code(rng, used) for _ in range(n_values if task == "multivalue" else 1)] for k in keys}
    needles = [f"Remember this: the secret code of {k} is {v}." for k in keys for v in values[k]]
    key = keys[0]
    if task == "multivalue":
        question = f"What are all the secret codes of {key} in the text above?\nAnswer: the secret codes of {key} are"
    else:
        question = f"What is the secret code of {key} in the text above?\nAnswer: the secret code of {key} is"
    return needles, question, tuple(values[key])


def make_trial(task: str, tokenizer, length: int, seed: int, sentences: list[str] | None = None,
               n_keys: int | None = None, n_values: int = 4, chain: int = 4) -> Trial:
    """A trial of `task` whose prompt (`Trial.prompt`) is at most `length` tokens of `tokenizer` and within about
    a sentence of it. sentences: the haystack's source (`text_sentences` of a text; a contiguous run is taken from a
    seeded start); None: generated sentences. n_keys: needles' keys (single: 1; multikey: 4; multivalue: 1;
    variables: chains, the first asked about)."""
    if task not in TASKS:
        raise KvconvertError(f"unknown long-context task {task!r}: choose from {', '.join(TASKS)}")
    rng = random.Random(f"{task}/{length}/{seed}")
    n_keys = n_keys or {"single": 1, "multikey": 4, "multivalue": 1, "variables": 2}[task]
    needles, question, answers = _needles(task, rng, n_keys, n_values, chain)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    budget = length - n_tokens("\n\n" + question) - sum(n_tokens(" " + s) for s in needles)
    if budget < 16:
        raise KvconvertError(f"{length} tokens leave no room for a haystack around the {task} task's needles")
    hay, used = [], 0
    start = rng.randrange(len(sentences)) if sentences else 0
    while used < budget:
        if sentences is None:
            s = _generated_sentence(rng)
        elif len(hay) < len(sentences):
            s = sentences[(start + len(hay)) % len(sentences)]
        else:
            raise KvconvertError(f"the haystack text is too short for {length} tokens ({used:,} tokens in all)")
        used += n_tokens(" " + s)
        hay.append(s)
    depths = sorted(rng.random() for _ in needles)
    order = list(range(len(needles)))
    if task != "variables":  # a chain's assignments stay in order; other needles fall anywhere
        rng.shuffle(order)
    while True:
        trial = _assemble(task, length, seed, hay, [needles[i] for i in order], depths, question, answers)
        if n_tokens(trial.prompt) <= length or len(hay) <= 1:
            return trial
        hay.pop()  # tokenizing sentences apart and together can differ by a token at each join


def _assemble(task, length, seed, hay, needles, depths, question, answers) -> Trial:
    parts = list(hay)
    for needle, depth in sorted(zip(needles, depths), key=lambda p: -p[1]):  # from the end, so indices hold
        parts.insert(round(depth * len(hay)), needle)
    return Trial(task, length, seed, " ".join(parts), question, answers, tuple(depths))


def prompt_ids(tokenizer, trial: Trial) -> list[int]:
    """The trial's prompt as token ids, without special tokens (its length was counted so)."""
    return tokenizer(trial.prompt, add_special_tokens=False).input_ids


def context_tokens(tokenizer, trial: Trial, ids: list[int]) -> int:
    """How many of the prompt's ids are its context's alone (a token at the join with the question that
    tokenizes differently in the whole prompt belongs to the question)."""
    context = tokenizer(trial.context, add_special_tokens=False).input_ids
    n = 0
    while n < min(len(context), len(ids)) and context[n] == ids[n]:
        n += 1
    return n


def answer_tokens(tokenizer, trial: Trial) -> int:
    """New tokens a reply gets: the answers written out, and a few more for the words around them."""
    return len(tokenizer(", ".join(trial.answers), add_special_tokens=False).input_ids) + 8


@torch.no_grad()
def run_suite(model, tokenizer, tasks: list[str], lengths: list[int], trials: int, seed: int = 0,
              sentences: list[str] | None = None, generate=None, progress=None) -> list[dict]:
    """Greedy replies to `trials` trials per task and length; one row per (task, length) with `accuracy` and
    `passed`, the trials' outcomes in order, and `recall`, the mean share of a trial's answers found (partial
    credit, as RULER scores its multi-answer tasks). A trial depends only on (task, length, seed + i) and the tokenizer, so
    two models with one tokenizer answer the same prompts and compare trial by trial (`compare_suites`).
    generate(ids, max_new_tokens, context) -> new ids replaces the model's own greedy generate (e.g. the runtime
    under a cache policy, `evaluate.runtime_generator`); context: how many of the ids are the haystack, before the
    question."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, done, total = [], 0, len(tasks) * len(lengths) * trials
    for task in tasks:
        for length in lengths:
            outcomes, shares, used = [], [], 0
            for i in range(trials):
                trial = make_trial(task, tokenizer, length, seed + i, sentences)
                ids, n_new = prompt_ids(tokenizer, trial), answer_tokens(tokenizer, trial)
                used = max(used, len(ids))
                if generate is not None:
                    new = generate(ids, n_new, context_tokens(tokenizer, trial, ids))
                else:
                    inp = torch.tensor([ids], device=device)
                    out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n_new,
                                         do_sample=False, pad_token_id=pad)
                    new = out[0, len(ids):]
                hits = found(tokenizer.decode(new, skip_special_tokens=True), trial.answers)
                outcomes.append(hits == len(trial.answers))
                shares.append(hits / len(trial.answers))
                done += 1
                if progress:
                    progress(done, total)
            rows.append({"task": task, "length": length, "prompt_tokens": used, "trials": trials,
                         "accuracy": sum(outcomes) / trials, "recall": sum(shares) / trials, "passed": outcomes})
    return rows


def compare_suites(rows: list[dict], reference: list[dict]) -> list[dict]:
    """Pair a model's suite with its reference's on the same trials: per (task, length), the reference's accuracy,
    the model's as a share of it (None where the reference found nothing; the same for recall), trials won and
    lost, and the exact McNemar p-value of that difference."""
    from .paired_comparison import mcnemar

    ref = {(r["task"], r["length"]): r for r in reference}
    out = []
    for row in rows:
        theirs = ref.get((row["task"], row["length"]))
        if theirs is None or len(theirs["passed"]) != len(row["passed"]):
            raise KvconvertError(f"the reference has no matching trials for {row['task']} at {row['length']} tokens")
        wins = sum(a and not b for a, b in zip(row["passed"], theirs["passed"]))
        losses = sum(b and not a for a, b in zip(row["passed"], theirs["passed"]))
        share = row["accuracy"] / theirs["accuracy"] if theirs["accuracy"] else None
        recall = row["recall"] / theirs["recall"] if theirs.get("recall") else None
        out.append(row | {"reference_accuracy": theirs["accuracy"], "of_reference": share,
                          "reference_recall": theirs.get("recall"), "recall_of_reference": recall, "wins": wins,
                          "losses": losses, "p": mcnemar(wins, losses)})
    return out


ANSWER_ROOM = 32  # tokens kept free after a prompt for the reply, within the model's positions
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)


def suite_lengths(asked: list[int] | None, positions: int) -> list[int]:
    """The suite's prompt lengths: those asked for (each at most the model's positions), or the default lengths the
    positions allow (the positions themselves where none does)."""
    if asked:
        over = [n for n in asked if n > positions]
        if over:
            raise KvconvertError(f"length {over[0]:,} is above the model's {positions:,} positions")
        return asked
    return [n for n in DEFAULT_LENGTHS if n <= positions] or [positions]


def prompt_length(length: int, positions: int) -> int:
    """Tokens a trial of `length` may take so that its reply still fits the positions."""
    return min(length, positions - ANSWER_ROOM)


@torch.no_grad()
def long_perplexity(model, tokenizer, text: str, length: int, max_tokens: int, reference=None, policy_factory=None,
                    progress=None, repeat: list[int] | None = None) -> dict:
    """Long-window perplexity: the text's first max(max_tokens, length) tokens in windows of `length`, each scored
    on its last quarter (the tokens with the most context behind them); with `reference`, its perplexity on the
    same tokens, the ratio, top-1 agreement and KL(reference || model) there. policy_factory: run the model in the
    runtime under that cache policy (the first three quarters are the prompt it compresses; repeat: see
    evaluate.repeat_ids)."""
    from .evaluate import score_windows, score_windows_with_policy, text_windows

    windows = text_windows(tokenizer, text, length, max(max_tokens, length))
    last = length // 4
    if policy_factory is not None:
        out = score_windows_with_policy(model, windows, policy_factory, last, progress=progress, repeat=repeat)
        out.pop("window_nll")
        if reference is not None:
            out["reference_perplexity"] = score_windows(reference, windows, batch_size=1, score_last=last)["perplexity"]
    else:  # the reference's perplexity comes with its KL, from the same forward passes
        out = score_windows(model, windows, reference, 1, progress, score_last=last)
    if reference is not None:
        out["perplexity_ratio"] = out["perplexity"] / out["reference_perplexity"]
    return out
