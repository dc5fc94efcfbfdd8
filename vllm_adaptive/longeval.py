"""RULER-style long-context tasks, generated offline and scored exactly.

Six tasks after RULER (Hsieh et al. 2024, arXiv 2404.06654), built from text
that ships with the interpreter (``text.py``: the ``eval`` split of Python's
own reference documentation, ~48K tokens of prose), so nothing is
downloaded and every case is reproducible from ``(task, length, seed,
index)``:

===============  ==========================================================
task             what the model must do
===============  ==========================================================
``niah_single``  one "special magic number" for a key, hidden in prose
``niah_multikey``  the number of one key among three distractor keys'
``niah_multivalue``  all four numbers given for one key (in four places)
``vt``           variable tracking: every variable a 4-hop chain of
                 assignments (``VAR QWXYZ = VAR ...``) gives a value
``fwe``          frequent words: the three most frequent of a list of coded
                 words drawn from a Zipf law (no prose)
``qa``           a question answered from one of several short documents
                 about invented places (the others are distractors of the
                 same template, hidden among prose paragraphs)
===============  ==========================================================

A case is a text prompt (the haystack fills it to within ``max_tokens`` of
the target length, counted with the model's tokenizer, BOS included), the
references and where the needles sit (``depths``, 0 = start of the
haystack, 1 = end). The prompt ends with the question and the start of the
answer (RULER's answer prefix), fed as plain text: with the passkey test the
model retrieved more keys plain than through its chat template
(``benchmarks/RESULTS.md``). ``score`` is RULER's: the fraction of the
references that occur in the output, case-insensitively (``qa``: 1 when any
of its references occurs). Greedy decoding makes every figure a function of
the prompts, so a run is repeated by its seeds, and the spread of a score
is the spread of its per-seed means.

``run_offline`` scores cases with a vLLM ``LLM``; ``run_openai`` with any
OpenAI-compatible completions endpoint (``vllm serve``, or another server).
``benchmarks/longeval.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import statistics
from typing import Any, Iterable, Sequence

TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "fwe", "qa")
# new tokens per task: the answers' length with room for the model to restate the question
MAX_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "vt": 48, "fwe": 40, "qa": 24}

_NIAH_TASK = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
              "them. I will quiz you about the numbers afterwards.")
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_NIAH_Q = "What is the special magic number for {key} mentioned in the provided text?"
_NIAH_QS = "What are all the special magic numbers for {key} mentioned in the provided text?"
_NIAH_A = "The special magic number for {key} mentioned in the provided text is"
_NIAH_AS = "The special magic numbers for {key} mentioned in the provided text are"
_KEY_WORDS = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "urban",
              "vivid", "wary", "young", "zesty")
_KEY_NOUNS = ("anchor", "badger", "canyon", "dagger", "engine", "falcon", "garden", "harbor", "island",
              "jacket", "kettle", "ladder", "meadow", "needle", "orchard", "pebble", "quarry", "ribbon",
              "saddle", "tunnel", "valley", "walrus", "yonder", "zipper")

_VT_TASK = ("Memorize and track the chain(s) of variable assignment hidden in the following text.")
_VT_Q = "Question: Find all variables that are assigned the value {value} in the text above."
_VT_A = ("Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
         "assigned the value {value}, they are:")

_FWE_TASK = ("Read the following coded text and track the frequency of each coded word. Find the three "
             "most frequently appeared coded words.")
_FWE_Q = "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most " \
         "frequently appeared words in the above coded text?"
_FWE_A = "Answer: According to the coded text above, the three most frequently appeared words are:"

_QA_TASK = "Answer the question based on the given documents. Only give me the answer and do not output " \
           "any other words. The following are given documents."
_QA_PLACES = ("Varnholm", "Brisela", "Kettenby", "Oldmere", "Tarrow", "Quenlin", "Dunmarsh", "Elkwater",
              "Fairhollow", "Grimsey", "Halvorn", "Ivelton", "Jorvale", "Lunsford", "Morrowind", "Nettlecombe",
              "Orrin Bay", "Pellham", "Ravensk", "Stonevale", "Thornbury", "Ulverholt", "Wexcombe", "Yarrowby")
_QA_RIVERS = ("Elde", "Marrow", "Tessel", "Brannock", "Isk", "Lumen", "Coldwater", "Ferris", "Ashby", "Dree")
_QA_TRADES = ("salt", "wool", "timber", "copper", "glass", "linen", "barley", "tin", "amber", "paper")
_QA_FOUNDERS = ("Oskar Brandt", "Mira Holt", "Tobias Renn", "Ada Kessler", "Lukas Varga", "Ines Morrow",
                "Henrik Lund", "Clara Voss", "Emil Strand", "Rosa Fenwick")
_QA_FACTS = (
    ("year", "In which year was {place} founded?", lambda r: str(r.randint(1200, 1899))),
    ("founder", "Who founded {place}?", lambda r: r.choice(_QA_FOUNDERS)),
    ("river", "Which river flows through {place}?", lambda r: r.choice(_QA_RIVERS)),
    ("trade", "What did {place} trade in?", lambda r: r.choice(_QA_TRADES)),
)
_QA_DOC = ("{place} is a small town founded in {year} by {founder}. The river {river} flows through its "
           "centre, and for two centuries the town grew rich by trading in {trade}. Its market square is "
           "still paved with the original stones.")


@dataclasses.dataclass(frozen=True)
class Case:
    task: str
    length: int  # target context: prompt tokens + max_tokens <= length
    seed: int
    index: int
    prompt: str
    references: tuple[str, ...]
    depths: tuple[float, ...]  # where the needles sit in the haystack
    max_tokens: int
    prompt_tokens: int


# ------------------------------------------------------------------ haystack


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    """The prose of ``text.py``'s eval split, one entry per paragraph
    (whitespace collapsed: a haystack is running text)."""
    from vllm_adaptive.text import split_documents

    out = []
    for _, doc in split_documents("eval"):
        for para in doc.split("\n\n"):
            para = " ".join(para.split())
            if len(para) > 40:
                out.append(para)
    return tuple(out)


class _Counter:
    """Token counts with the model's tokenizer, cached per piece of text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self._cache: dict[str, int] = {}

    def piece(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = self._cache[text] = len(self.tok(text, add_special_tokens=False)["input_ids"])
        return n

    def prompt(self, text: str) -> int:
        return len(self.tok(text)["input_ids"])  # as the server counts it: BOS included


def _haystack_units(rng: random.Random) -> Iterable[str]:
    """Paragraphs from a random place in the corpus onward, wrapping around."""
    paras = _paragraphs()
    start = rng.randrange(len(paras))
    i = start
    while True:
        yield paras[i % len(paras)]
        i += 1


def _fill(counter: _Counter, budget: int, units: Iterable[str], head: str, tail: str, needles: Sequence[str],
          depths: Sequence[float], sep: str = "\n\n") -> str:
    """``head`` + haystack with each needle at its depth + ``tail``, as many
    haystack units as keep the prompt within ``budget`` tokens."""
    overhead = counter.piece(head) + counter.piece(tail) + sum(counter.piece(n) + 2 for n in needles) + 8
    hay: list[str] = []
    total = overhead
    for u in units:
        n = counter.piece(u) + 1
        if total + n > budget:
            break
        hay.append(u)
        total += n

    def render(hay: list[str]) -> str:
        parts = list(hay)
        # insert from the deepest so earlier insertions keep their index
        for needle, d in sorted(zip(needles, depths), key=lambda x: -x[1]):
            parts.insert(round(d * len(hay)), needle)
        return head + sep.join(parts) + tail

    text = render(hay)
    while counter.prompt(text) > budget and hay:  # joining can merge pieces: trim until it fits
        hay.pop()
        text = render(hay)
    return text


# ------------------------------------------------------------------ tasks


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(_KEY_WORDS)}-{rng.choice(_KEY_NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def _number(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = str(rng.randrange(1_000_000, 10_000_000))
        if v not in taken:
            taken.add(v)
            return v


def _niah(kind: str, counter: _Counter, budget: int, rng: random.Random):
    keys: set[str] = set()
    values: set[str] = set()
    key = _key(rng, keys)
    if kind == "niah_single":
        refs = (_number(rng, values),)
        needles = [_NIAH_NEEDLE.format(key=key, value=refs[0])]
    elif kind == "niah_multikey":
        refs = (_number(rng, values),)
        needles = [_NIAH_NEEDLE.format(key=key, value=refs[0])]
        needles += [_NIAH_NEEDLE.format(key=_key(rng, keys), value=_number(rng, values)) for _ in range(3)]
    else:  # niah_multivalue
        refs = tuple(_number(rng, values) for _ in range(4))
        needles = [_NIAH_NEEDLE.format(key=key, value=v) for v in refs]
    depths = [rng.random() for _ in needles]
    multi = kind == "niah_multivalue"
    tail = "\n\n" + (_NIAH_QS if multi else _NIAH_Q).format(key=key) + " " + \
        (_NIAH_AS if multi else _NIAH_A).format(key=key)
    text = _fill(counter, budget, _haystack_units(rng), _NIAH_TASK + "\n\n", tail, needles, depths)
    return text, refs, depths


def _vt(counter: _Counter, budget: int, rng: random.Random):
    names: set[str] = set()

    def name() -> str:
        while True:
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if n not in names:
                names.add(n)
                return n

    value = str(rng.randrange(10_000, 100_000))
    chain = [name() for _ in range(5)]
    needles = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, 5)]
    depths = sorted(rng.random() for _ in needles)  # in chain order, as RULER
    tail = "\n\n" + _VT_Q.format(value=value) + " " + _VT_A.format(n=len(chain), value=value)
    text = _fill(counter, budget, _haystack_units(rng), _VT_TASK + "\n\n", tail, needles, depths)
    return text, tuple(chain), tuple(depths)


def _fwe(counter: _Counter, budget: int, rng: random.Random):
    """Coded words with Zipf frequencies (RULER's ``fwe``, alpha 2): the top
    three have distinct counts, so the answer is unique."""
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < 400:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 7)))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    weights = [1.0 / (r + 1) ** 2 for r in range(len(vocab))]
    tail = "\n\n" + _FWE_Q + " " + _FWE_A
    head = _FWE_TASK + "\n\n"
    # more words than fit (a word and its dots take 3 tokens or more): _fill keeps what fits
    n_words = max(16, budget // 3)
    while True:
        words = rng.choices(vocab, weights, k=n_words)
        counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
        top = counts[:4]
        if len(top) == 4 and top[0][0] > top[1][0] > top[2][0] > top[3][0]:
            break
    units = iter([" ".join(f"{w} ...." for w in words[i:i + 8]) for i in range(0, len(words), 8)])
    text = _fill(counter, budget, units, head, tail, [], [], sep=" ")
    kept = text[len(head):len(text) - len(tail)].split()
    counts = sorted(((kept.count(w), w) for w in set(kept) if w != "...."), reverse=True)
    if not (len(counts) > 3 and counts[0][0] > counts[1][0] > counts[2][0] > counts[3][0]):
        return None  # trimming made a tie: the caller draws again
    return text, tuple(w for _, w in counts[:3]), ()


def _qa(counter: _Counter, budget: int, rng: random.Random):
    places = rng.sample(_QA_PLACES, 5)
    docs = []
    for p in places:
        facts = {name: make(rng) for name, _, make in _QA_FACTS}
        docs.append((p, facts, _QA_DOC.format(place=p, **facts)))
    gold_place, gold_facts, _ = docs[0]
    name, question, _ = rng.choice(_QA_FACTS)
    depths = [rng.random() for _ in docs]
    # number the documents in order of appearance: the haystack paragraphs are documents too
    needles = [f"@@{i}@@" for i in range(len(docs))]
    tail = "\n\nAnswer the question based on the given documents. Only give me the answer and do not output " \
           f"any other words.\n\nQuestion: {question.format(place=gold_place)} Answer:"
    text = _fill(counter, budget, _haystack_units(rng), _QA_TASK + "\n\n", tail, needles, depths)
    parts = text[len(_QA_TASK) + 2:len(text) - len(tail)].split("\n\n")

    def render(parts: list[str]) -> str:  # placeholders become the town documents; every part is numbered
        out = [f"Document {j + 1}:\n{docs[int(p[2:-2])][2] if p.startswith('@@') else p}"
               for j, p in enumerate(parts)]
        return _QA_TASK + "\n\n" + "\n\n".join(out) + tail

    text = render(parts)
    while counter.prompt(text) > budget:  # the document headers: drop prose documents from the end
        prose = [j for j, p in enumerate(parts) if not p.startswith("@@")]
        if not prose:
            break
        parts.pop(prose[-1])
        text = render(parts)
    return text, (gold_facts[name],), (depths[0],)


def make_cases(tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int], seeds: Sequence[int],
               per_seed: int) -> list[Case]:
    """``per_seed`` cases of every task and length for each seed. Case
    ``(task, length, seed, index)`` is the same whatever else is asked for."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}: the tasks are {list(TASKS)}")
    counter = _Counter(tokenizer)
    cases = []
    for task in tasks:
        for length in lengths:
            budget = length - MAX_TOKENS[task]
            if budget < 256:
                raise ValueError(f"length {length} leaves {budget} prompt tokens for {task}: at least 256 needed")
            for seed in seeds:
                for i in range(per_seed):
                    rng = random.Random(f"{task}-{length}-{seed}-{i}")
                    made = None
                    while made is None:
                        if task.startswith("niah"):
                            made = _niah(task, counter, budget, rng)
                        else:
                            made = {"vt": _vt, "fwe": _fwe, "qa": _qa}[task](counter, budget, rng)
                    text, refs, depths = made
                    cases.append(Case(task, length, seed, i, text, tuple(refs), tuple(depths), MAX_TOKENS[task],
                                      counter.prompt(text)))
    return cases


# ------------------------------------------------------------------ scoring


def score(case: Case, output: str) -> float:
    """RULER's string match: the fraction of the references in ``output``
    (``qa``: 1.0 when any occurs), case-insensitive."""
    out = output.lower()
    hits = [r.lower() in out for r in case.references]
    if case.task == "qa":
        return float(any(hits))
    return sum(hits) / len(hits)


def summarize(cases: Sequence[Case], scores: Sequence[float]) -> dict:
    """Per (task, length): mean score in percent over all cases, the
    per-seed means and their spread (population standard deviation)."""
    groups: dict[tuple[str, int], dict[int, list[float]]] = {}
    for c, s in zip(cases, scores):
        groups.setdefault((c.task, c.length), {}).setdefault(c.seed, []).append(s)
    out = {}
    for (task, length), by_seed in sorted(groups.items()):
        seed_means = [100 * statistics.fmean(v) for v in by_seed.values()]
        allv = [x for v in by_seed.values() for x in v]
        out[f"{task}@{length}"] = {"task": task, "length": length, "n": len(allv),
                                   "score": 100 * statistics.fmean(allv), "seed_means": seed_means,
                                   "seed_std": statistics.pstdev(seed_means) if len(seed_means) > 1 else 0.0}
    return out


# ------------------------------------------------------------------ runners


def run_offline(llm: Any, cases: Sequence[Case]) -> list[str]:
    """Outputs of ``llm`` (a vLLM ``LLM``) for ``cases``, greedy, one batch."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=c.max_tokens) for c in cases]
    outs = llm.generate([c.prompt for c in cases], params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def run_openai(base_url: str, model: str, cases: Sequence[Case], concurrency: int = 16,
               api_key: str = "EMPTY", timeout: float = 3600) -> list[str]:
    """Outputs of an OpenAI-compatible completions endpoint for ``cases``,
    greedy, ``concurrency`` requests in flight."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

    def one(c: Case) -> str:
        r = client.completions.create(model=model, prompt=c.prompt, max_tokens=c.max_tokens, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, cases))
