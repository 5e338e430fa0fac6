"""Every Python snippet in README.md and in the Markdown of docs/ and benchmarks/ runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "benchmarks").glob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list:
    found = []
    for document in DOCUMENTS:
        for number, match in enumerate(SNIPPET.finditer(document.read_text()), start=1):
            line = document.read_text().count("\n", 0, match.start()) + 1
            found.append(pytest.param(match.group(1), id=f"{document.name}:{line}:{number}"))
    return found


def test_documents_have_snippets():
    assert len(snippets()) >= 2, "README.md lost its quickstart and training-loop snippets"


@pytest.mark.parametrize("code", snippets())
def test_snippet_runs(code):
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
