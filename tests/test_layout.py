"""The house rules of the layout (docs/architecture.md) that a grep can check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kdfast"
MODULES = sorted(PACKAGE.rglob("*.py"))
PRIVATE_IMPORT = re.compile(r"^\s*(?:from|import)\s+kdfast\.(\w+)\.(_\w+)", re.M)


def subpackage(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_import_across_subpackages(module):
    crossing = [f"kdfast.{package}.{name}" for package, name in
                PRIVATE_IMPORT.findall(module.read_text()) if package != subpackage(module)]
    assert not crossing, (f"{module.name} imports private modules of another subpackage "
                          f"{crossing}: make the name public or move it to kdfast/_*.py")


@pytest.mark.parametrize("module", sorted((PACKAGE / "losses").glob("*.py")),
                         ids=lambda p: p.name)
def test_losses_register_nothing_and_choose_by_constant(module):
    text = module.read_text()
    assert "backends.register" not in text, "cores register in kdfast/ops/<core>.py"
    assert not re.search(r"backends\.choose\(\s*[\"']", text), \
        "choose by the CORE constant of the ops file, not a string"


def test_every_core_registers_in_its_ops_file():
    from kdfast import backends
    ops_text = "".join(p.read_text() for p in (PACKAGE / "ops").glob("*.py"))
    for core in backends._REGISTRY:
        assert f'CORE = "{core}"' in ops_text or f'= "{core}"' in ops_text, \
            f"core {core!r} has no constant in kdfast/ops/"
