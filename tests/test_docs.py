"""The documentation cannot drift: the configuration page is generated from the settings, and
every relative link in README.md and docs/*.md points to a file (and a heading) that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\\[\[\]])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _conf_doc():
    spec = importlib.util.spec_from_file_location("conf_doc", ROOT / "scripts" / "conf_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(page: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(_prose(page.read_text(encoding="utf-8")))]


def test_configuration_page_is_generated_from_the_settings():
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == _conf_doc().render(), (
        "docs/configuration.md differs from what scripts/conf_doc.py generates from "
        "apps/segvol/lib/settings.py: run `python scripts/conf_doc.py --write`"
    )


def test_every_conf_option_is_on_the_configuration_page():
    from lib.settings import HELP

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert [key for key in HELP if f"| `{key}` |" not in text] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(page: Path):
    missing = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(ROOT):
            missing.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            missing.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            missing.append(f"{target} (no such heading in {resolved.relative_to(ROOT)})")
    assert missing == [], f"{page.relative_to(ROOT)}: broken links: {missing}"


def test_the_link_check_sees_links_and_skips_code():
    page = ROOT / "build" / "test-docs-sample.md"
    page.parent.mkdir(exist_ok=True)
    page.write_text(
        "# A `code` heading (x)\n[a](docs/ohif.md) ![b](docs/img/x.png) `[c](not/a/link.md)`\n"
        "```\n[d](inside/a/fence.md)\n# not a heading\n```\n[e](#a-code-heading-x)\n",
        encoding="utf-8",
    )
    try:
        assert _links(page) == ["docs/ohif.md", "docs/img/x.png", "#a-code-heading-x"]
        assert _anchors(page) == {"a-code-heading-x"}
    finally:
        page.unlink()
