"""The long-context eval's cases (``vllm_adaptive/longeval.py``): each task's
prompt holds what its answer needs, fits its length, and is reproducible;
scoring is RULER's string match. No engine: the tokenizer only."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from vllm_adaptive import longeval

LENGTHS = (1024, 2048)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def cases(tokenizer):
    return longeval.make_cases(tokenizer, longeval.TASKS, LENGTHS, seeds=[0, 1], per_seed=2)


def test_every_task_length_and_seed_is_there(cases):
    got = Counter((c.task, c.length, c.seed) for c in cases)
    assert got == {(t, L, s): 2 for t in longeval.TASKS for L in LENGTHS for s in (0, 1)}


def test_prompts_fill_their_length_and_leave_room_for_the_answer(cases, tokenizer):
    for c in cases:
        n = len(tokenizer(c.prompt)["input_ids"])
        assert n == c.prompt_tokens
        assert n + c.max_tokens <= c.length, (c.task, c.length, n)
        # the haystack is cut at a paragraph (or 8 coded words): within 15% of the budget
        assert n >= 0.85 * (c.length - c.max_tokens), (c.task, c.length, n)


def test_a_case_is_the_same_whatever_else_is_asked(cases, tokenizer):
    alone = longeval.make_cases(tokenizer, ["vt"], [2048], seeds=[1], per_seed=2)
    assert alone == [c for c in cases if (c.task, c.length, c.seed) == ("vt", 2048, 1)]
    assert len({c.prompt for c in cases}) == len(cases), "two cases share a prompt"


def test_needles_hold_the_answer_and_distractors_do_not(cases):
    for c in (c for c in cases if c.task.startswith("niah")):
        key = re.search(r"special magic numbers? for (\S+) mentioned", c.prompt).group(1)
        found = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", c.prompt)
        assert sorted(found) == sorted(c.references), c.task
        others = re.findall(r"special magic numbers for (\S+) is: (\d+)", c.prompt)
        if c.task == "niah_multikey":
            assert len({k for k, _ in others}) == 4 and not set(c.references) & {v for k, v in others if k != key}


def test_variable_chain_resolves_to_the_references(cases):
    for c in (c for c in cases if c.task == "vt"):
        value = re.search(r"assigned the value (\d+) in the text above", c.prompt).group(1)
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", c.prompt))
        hits = set()
        for name in assigned:
            v = assigned[name]
            while v.startswith("VAR "):
                v = assigned[v[4:]]
            if v == value:
                hits.add(name)
        assert hits == set(c.references)


def test_frequent_words_are_the_most_frequent(cases):
    for c in (c for c in cases if c.task == "fwe"):
        body = c.prompt.split("\n\n")[1]
        counts = Counter(w for w in body.split() if w != "....").most_common(4)
        assert tuple(w for w, _ in counts[:3]) == c.references
        assert counts[2][1] > counts[3][1], "a tie for third place makes the answer ambiguous"


def test_qa_answer_is_in_one_document_only(cases):
    for c in (c for c in cases if c.task == "qa"):
        place = re.search(r"Question: (?:In which year was|Who founded|Which river flows through|What did) "
                          r"(.+?)(?: founded\?| trade in\?|\?)", c.prompt).group(1)
        docs = [d for d in c.prompt.split("\n\nDocument ") if d.split(":\n", 1)[-1].startswith(place + " is a")]
        assert len(docs) == 1 and c.references[0] in docs[0]
        assert sum(f"{p} is a small town" in c.prompt for p in longeval._QA_PLACES) == 5


def test_score_is_the_fraction_of_references_found():
    c = longeval.Case("niah_multivalue", 1024, 0, 0, "", ("111", "222", "333", "444"), (), 8, 0)
    assert longeval.score(c, "they are 111, 333 and 999") == 0.5
    q = longeval.Case("qa", 1024, 0, 0, "", ("Elde",), (), 8, 0)
    assert longeval.score(q, " The river elde.") == 1.0 and longeval.score(q, "Isk") == 0.0


def test_summary_spread_is_across_seeds():
    cs = [longeval.Case("vt", 1024, s, i, "", ("A",), (), 8, 0) for s in (0, 1) for i in range(2)]
    out = longeval.summarize(cs, [1.0, 1.0, 0.0, 1.0])
    cell = out["vt@1024"]
    assert cell["score"] == 75.0 and cell["seed_means"] == [100.0, 50.0] and cell["seed_std"] == 25.0


def test_unknown_task_and_too_short_length_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'niah'"):
        longeval.make_cases(tokenizer, ["niah"], [1024], [0], 1)
    with pytest.raises(ValueError, match="length 200 leaves"):
        longeval.make_cases(tokenizer, ["qa"], [200], [0], 1)
