"""Real English text without downloads: the interpreter's own documentation.

``pydoc_data.topics.topics`` (shipped with CPython, what ``help("if")``
prints) maps ~80 topic names to sections of the Python reference: about
465 KB of prose and grammar, ~113K SmolLM2 tokens on Python 3.11.

The topics overlap (``compound`` contains the text of ``if``, ``while``, ...;
``else`` and ``if`` are identical), so the corpus is cut in three deterministic
steps, such that no paragraph occurs in both splits:

1. Topics are taken in sorted key order; each is split into paragraphs at
   blank lines.
2. Every paragraph is kept only at its first occurrence in that order (exact
   match after stripping whitespace); a topic left empty is dropped.
3. The remaining documents alternate: index 0, 2, 4, ... go to ``"calib"``,
   1, 3, 5, ... to ``"eval"``. A split's text is its documents joined by a
   blank line, in order.

On Python 3.11.7 this gives 39 documents and 42,472 SmolLM2 tokens for
``calib``, 39 documents and 48,348 tokens for ``eval`` (check with
:func:`available_tokens`): several 8K windows each, so no second source is
needed. Near-identical paragraphs (one word apart) may still share a phrase:
5 of the 48K token 32-grams of ``eval`` also occur in ``calib``.
The text depends on the interpreter version (see :func:`source_description`),
so results are only comparable for the same Python.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

SPLITS: tuple[str, ...] = ("calib", "eval")


def source_description() -> str:
    """Where the text comes from, with the interpreter version it depends on."""
    v = sys.version_info
    return f"pydoc_data.topics of Python {v.major}.{v.minor}.{v.micro}"


@functools.cache
def _documents() -> tuple[tuple[str, str], ...]:
    """``(topic, text)`` pairs, sorted by topic, each paragraph kept once."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    for key in sorted(topics):
        kept = []
        for para in topics[key].split("\n\n"):
            para = para.strip("\n")
            if not para.strip() or para.strip() in seen:
                continue
            seen.add(para.strip())
            kept.append(para)
        if kept:
            docs.append((key, "\n\n".join(kept)))
    return tuple(docs)


def split_documents(split: str) -> tuple[tuple[str, str], ...]:
    """The ``(topic, text)`` documents of ``split``, in order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return _documents()[SPLITS.index(split) :: len(SPLITS)]


def split_text(split: str) -> str:
    """The whole text of ``split``: its documents joined by a blank line."""
    return "\n\n".join(text for _, text in split_documents(split))


def _tokens(split: str, tokenizer: Any) -> list[int]:
    return list(tokenizer(split_text(split), add_special_tokens=False)["input_ids"])


def available_tokens(split: str, tokenizer: Any) -> int:
    """How many tokens ``split`` holds for ``tokenizer``."""
    return len(_tokens(split, tokenizer))


def real_text(split: str, num_tokens: int, tokenizer: Any) -> list[int]:
    """The first ``num_tokens`` token ids of ``split`` (no special tokens).

    The whole split is tokenized at once and cut, so a shorter request is a
    prefix of a longer one. Raises ``ValueError`` when the split is shorter.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    ids = _tokens(split, tokenizer)
    if num_tokens > len(ids):
        raise ValueError(
            f"split {split!r} of {source_description()} holds {len(ids)} tokens "
            f"for this tokenizer, {num_tokens} were asked for"
        )
    return ids[:num_tokens]


# Ragged chat-style prompts, one spanning many cache blocks: the engine
# identity tests (tests/test_engine.py) and benchmarks/agreement.py use them.
_LONG = " ".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog while counting sheep." for i in range(45)
)
SAMPLE_PROMPTS: tuple[str, ...] = (
    "Hello",
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):\n    ",
    "Q: What is 17 times 23?\nA:",
    _LONG + "\nSummarize the lines above in one sentence:",
    "List three colours: red, green,",
    "Translate to French: 'The cat sleeps on the warm windowsill every afternoon.'",
)


_COLOURS = ("red", "blue", "green", "brown", "white")


def warehouse_prompt(n_items: int, secret_at: int, code: str) -> str:
    """A list of ``n_items`` boxes with a secret code hidden at item
    ``secret_at``, ending in the question (about 14 tokens per item): the
    long prompts of the release, Ray and load checks."""
    items = [f"Item {i}: a {_COLOURS[i % 5]} box sits on shelf {i % 7}." for i in range(n_items)]
    items.insert(secret_at, f"The secret code is {code}. Keep it in mind.")
    return ("Here is a list of boxes in a small warehouse. " + " ".join(items)
            + " Question: what is the secret code? Answer: the secret code is")
