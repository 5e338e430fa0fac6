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


README_SECTIONS = ["## Install", "## Quickstart", "## The losses",
                   "## Use it in your training loop", "## Backends", "## Benchmarks",
                   "## Development"]


def test_readme_is_short_and_in_order():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 180, "README.md must stay within 180 lines"
    positions = [text.find(heading + "\n") for heading in README_SECTIONS]
    assert -1 not in positions, f"README.md lost a section of {README_SECTIONS}"
    assert positions == sorted(positions), f"README.md sections out of order {README_SECTIONS}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
def test_no_tracker_numbers(document):
    found = re.findall(r"\bissue[- ]?#?\d+", document.read_text(), re.I)
    assert not found, f"{document.name} cites tracker numbers {found}: say what, not where"


def test_code_cites_documents_that_exist():
    cited = set()
    for path in [*(ROOT / "kdfast").rglob("*.py"), *(ROOT / "csrc").rglob("*.[ch]*")]:
        cited.update(re.findall(r"\b((?:docs|benchmarks)/[\w./-]+\.md)\b", path.read_text()))
    missing = sorted(c for c in cited if not (ROOT / c).exists())
    assert not missing, f"code cites documents that are not in the repository: {missing}"
