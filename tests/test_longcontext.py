"""Synthetic long-context tasks: deterministic per seed, sized to the length asked, answers parsed as documented."""

import re

import pytest

from kvconvert.errors import KvconvertError
from kvconvert.longcontext import (TASKS, compare_suites, context_tokens, make_trial, passed, prompt_ids, run_suite,
                                   text_sentences)

from conftest import byte_tokenizer

TOK = byte_tokenizer()


def n_tokens(text: str) -> int:
    return len(TOK(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("task", TASKS)
def test_a_trial_is_a_function_of_task_length_and_seed(task):
    a, b = make_trial(task, TOK, 1500, seed=3), make_trial(task, TOK, 1500, seed=3)
    assert a == b
    others = {make_trial(task, TOK, 1500, seed=s).prompt for s in range(4, 8)}
    assert a.prompt not in others and len(others) == 4


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [700, 2048])
def test_the_prompt_fills_the_length_and_holds_every_answer(task, length):
    t = make_trial(task, TOK, length, seed=1)
    used = n_tokens(t.prompt)
    assert length - 80 <= used <= length  # a byte tokenizer: about one sentence of slack
    for answer in t.answers:
        assert answer in t.context
    assert not passed(t.question, t.answers)  # the question does not give the answer away
    assert all(0 <= d <= 1 for d in t.depths) and list(t.depths) == sorted(t.depths)


def test_needles_sit_at_their_depths():
    t = make_trial("multikey", TOK, 4000, seed=2)
    sentences = text_sentences(t.context)
    for answer in t.answers:
        at = next(i for i, s in enumerate(sentences) if answer in s)
        assert any(abs(at / len(sentences) - d) < 0.02 for d in t.depths)
    keys = re.findall(r"the secret code of (\w+) is", t.context)
    assert len(keys) == 4 and len(set(keys)) == 4  # three distractor keys beside the one asked


def test_multivalue_asks_for_every_value_and_variables_follow_the_chain():
    mv = make_trial("multivalue", TOK, 1000, seed=0)
    assert len(mv.answers) == 4 and len(set(mv.answers)) == 4
    vt = make_trial("variables", TOK, 1000, seed=0)
    value = re.search(r"hold the value (\d{5})", vt.question).group(1)
    assigned = dict(re.findall(r"VAR (\w{5}) = (?:VAR )?(\w+)", vt.context))
    holders = {name for name in assigned if _resolve(assigned, name) == value}
    assert holders == set(vt.answers) and len(holders) == 4
    distractors = {v for v in assigned.values() if v.isdigit()} - {value}
    assert len(distractors) == 1  # a second chain with its own value


def _resolve(assigned: dict, name: str) -> str:
    while not assigned[name].isdigit():
        name = assigned[name]
    return assigned[name]


def test_answers_are_parsed_as_whole_words():
    assert passed("The secret code of amber is 12345.", ("12345",))
    assert passed("12345 and 67890", ("67890", "12345"))
    assert not passed("The code is 123456.", ("12345",))  # inside a longer number
    assert not passed("12345 only", ("12345", "67890"))  # every answer is needed
    assert passed("the variables are ABCDE, FGHIJ", ("FGHIJ", "ABCDE"))
    assert not passed("ABCDEF", ("ABCDE",))


def test_a_text_haystack_is_a_contiguous_run_of_its_sentences():
    text = " ".join(f"Sentence number {i} of the book." for i in range(400))
    t = make_trial("single", TOK, 800, seed=5, sentences=text_sentences(text))
    numbers = [int(n) for n in re.findall(r"Sentence number (\d+)", t.context)]
    assert len(numbers) > 10 and all((b - a) % 400 == 1 for a, b in zip(numbers, numbers[1:]))


def test_bad_requests_are_refused_in_one_line():
    with pytest.raises(KvconvertError, match="unknown long-context task 'needle'"):
        make_trial("needle", TOK, 1000, seed=0)
    with pytest.raises(KvconvertError, match="too short"):
        make_trial("single", TOK, 4000, seed=0, sentences=text_sentences("One short text. Two sentences."))
    with pytest.raises(KvconvertError, match="no room"):
        make_trial("variables", TOK, 100, seed=0)


def oracle(ids, max_new_tokens, context=None):
    """A reader that always finds the asked code in the prompt: the suite's plumbing without a model."""
    text = TOK.decode(ids)
    key = re.findall(r"secret codes? of (\w+) in the text above", text)[-1]
    codes = re.findall(rf"the secret code of {key} is (\d{{5}})\.", text)
    return TOK(" " + ", ".join(codes), add_special_tokens=False).input_ids[:max_new_tokens]


def test_the_suite_pairs_a_model_with_its_reference_trial_by_trial():
    from conftest import tiny_source

    model = tiny_source("llama")
    perfect = run_suite(model, TOK, ["single", "multivalue"], [700], trials=4, generate=oracle)
    assert [r["accuracy"] for r in perfect] == [1.0, 1.0] and all(r["prompt_tokens"] <= 700 for r in perfect)
    itself = compare_suites(perfect, perfect)
    assert all(r["of_reference"] == 1.0 and r["p"] == 1.0 and r["wins"] == r["losses"] == 0 for r in itself)
    tiny = run_suite(model, TOK, ["single", "multivalue"], [700], trials=4)  # a random model finds nothing
    assert tiny == run_suite(model, TOK, ["single", "multivalue"], [700], trials=4)  # greedy: the same replies
    against = compare_suites(tiny, perfect)
    assert all(r["of_reference"] == 0.0 and r["losses"] == 4 and r["p"] == 0.125 for r in against)
    with pytest.raises(KvconvertError, match="no matching trials"):
        compare_suites(tiny, perfect[:1])


@pytest.mark.parametrize("task", TASKS)
def test_the_context_split_leaves_the_whole_question_after_it(task):
    """context_tokens: the prompt's first n ids are its haystack's own tokens, at most one token short of them (a
    token across the join belongs to the question), and what follows holds the question whole."""
    for seed in range(4):
        trial = make_trial(task, TOK, 600, seed)
        ids = prompt_ids(TOK, trial)
        n = context_tokens(TOK, trial, ids)
        alone = TOK(trial.context, add_special_tokens=False).input_ids
        assert ids[:n] == alone[:n] and len(alone) - 1 <= n <= len(alone)
        assert TOK.decode(ids[n:]).strip().endswith(trial.question)
