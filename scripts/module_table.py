"""Print the module table of ``docs/ARCHITECTURE.md`` from the tree: one row
per module of ``vllm_adaptive/`` and ``patches/``, with the first sentence of
its docstring. ``--check`` exits 1 if the doc's table differs (the test
suite runs it), so the table cannot drift from the code.

    python scripts/module_table.py            # print the table
    python scripts/module_table.py --write    # replace it in the doc
    python scripts/module_table.py --check
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
BEGIN, END = "<!-- module table: begin -->", "<!-- module table: end -->"


def first_sentence(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    text = " ".join(doc.split())
    m = re.match(r"(.+?\.)(\s|$)", text)
    out = (m.group(1) if m else text).replace("|", "\\|")
    return out or "(no docstring)"


def rows() -> list[str]:
    out = []
    for base in ("vllm_adaptive", "patches"):
        for path in sorted((ROOT / base).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            out.append(f"| `{rel}` | {first_sentence(path)} |")
    return out


def table() -> str:
    return "\n".join([BEGIN, "| module | what it holds (its docstring's first sentence) |", "|---|---|", *rows(), END])


def main(argv: list[str]) -> int:
    doc = DOC.read_text()
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < 0:
        print(f"{DOC}: no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    current = doc[start:end + len(END)]
    if "--check" in argv:
        if current != table():
            print("docs/ARCHITECTURE.md's module table is stale: run python scripts/module_table.py --write",
                  file=sys.stderr)
            return 1
        return 0
    if "--write" in argv:
        DOC.write_text(doc.replace(current, table()))
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
