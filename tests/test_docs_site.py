"""The documentation site: it builds under ``mkdocs build --strict`` (broken links, missing pages and
unresolved API references fail), and every method name has a place on a method-family page."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unipelt

ROOT = Path(__file__).resolve().parents[1]
FAMILY_PAGES = sorted((ROOT / "docs" / "families").glob("*.md"))
# a method is documented when a table row or a heading of a family page names it as `name`
ENTRY_LINE = re.compile(r"^\s*(\||#)")
CODE_SPAN = re.compile(r"`([^`\s]+)`")


def test_docs_tools_are_installed() -> None:
    """The docs packages are in the test extra: a missing one is a failure, not a skip."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        importlib.import_module(module)


def test_site_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    for page in ("index.html", "getting-started/index.html", "families/adapters/index.html",
                 "reference/core/index.html", "methods/index.html", "api/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    # mkdocstrings rendered the API reference from the docstrings
    assert 'id="unipelt.core.attach"' in (site / "reference" / "core" / "index.html").read_text()


def documented_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for page in FAMILY_PAGES:
        found = set()
        for line in page.read_text().splitlines():
            if ENTRY_LINE.match(line):
                found.update(CODE_SPAN.findall(line))
        names[page.name] = found
    return names


def test_family_pages_exist() -> None:
    assert len(FAMILY_PAGES) >= 6, [p.name for p in FAMILY_PAGES]


@pytest.mark.parametrize("name", sorted(unipelt.methods()))
def test_every_method_has_a_family_page_entry(name: str) -> None:
    pages = documented_names()
    where = [page for page, found in pages.items() if name in found]
    assert where, (f"method {name!r} (unipelt.methods()) is named in no table row or heading of "
                   f"docs/families/*.md; add it to its family's page as `{name}`")
