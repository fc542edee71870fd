"""The documentation holds together: every relative link in README.md, CONTRIBUTING.md, bench/README.md, data/README.md
and docs/*.md reaches a file that exists, every #anchor a heading of its target (by GitHub's slug), and the README's
documentation table lists every page of docs/. Pure text: no markdown renderer, no network."""

import re
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "bench" / "README.md", ROOT / "data" / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def prose(text: str) -> str:
    """The text links can live in: fenced code blocks blanked, code spans kept as text without their backticks
    (a link inside a code span is not a link, so its brackets are dropped too)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub(lambda m: m.group(2).replace("[", " ").replace("]", " "), text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links as their text, formatting dropped), lower-cased, every character
    that is not a letter, digit, '_', '-' or space removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's slug, with GitHub's -1, -2 ... for repeated ones."""
    found, seen = set(), {}
    for _, title in HEADING.findall(prose(page.read_text(encoding="utf-8"))):
        base = slug(title)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) for every relative link of a page (web addresses and mail left out)."""
    text = prose(page.read_text(encoding="utf-8"))
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in LINK.finditer(text) if not re.match(r"[a-z][a-z0-9+.-]*:", m.group(2), re.I)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for line, target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{line}: {target}"
        if not resolved.exists():
            broken.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where}: no heading with that anchor in {resolved.relative_to(ROOT)}")
        elif anchor and resolved.suffix != ".md":
            broken.append(f"{where}: an anchor into a file that is not markdown")
    assert not broken, "\n".join(broken)


def test_the_readme_documentation_table_lists_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Documentation\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    assert section, "README.md has no '## Documentation' section"
    listed = {(ROOT / target.partition("#")[0]).resolve() for _, target in links_in(section.group(1))}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in listed]
    assert not missing, f"README's documentation table does not list docs/{missing}"


def links_in(text: str) -> list[tuple[int, str]]:
    return [(0, m.group(2)) for m in LINK.finditer(prose(text))]


def test_the_link_checker_finds_what_is_broken(tmp_path):
    """The checker itself: slugs as GitHub makes them, a missing file, a missing anchor, links in code left alone."""
    assert slug("A fresh machine's first `make run`") == "a-fresh-machines-first-make-run"
    assert slug("Sharing: model cards, the Hub, Ollama") == "sharing-model-cards-the-hub-ollama"
    assert slug("Chat files: OpenAI messages, ShareGPT, Alpaca") == "chat-files-openai-messages-sharegpt-alpaca"
    assert slug("Side by side: a GPU pool or a cluster") == "side-by-side-a-gpu-pool-or-a-cluster"
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Part\n\n## Part\n\n[ok](#part-1) [gone](other.md) [bad](#nowhere) [web](https://example.com)\n"
        "`[not a link](missing.md)`\n\n```\n[nor this](missing.md)\n```\n",
        encoding="utf-8",
    )
    assert anchors(page) == {"title", "part", "part-1"}
    assert [t for _, t in links(page)] == ["#part-1", "other.md", "#nowhere"]


def test_the_readme_routes_in_at_most_250_lines():
    """The README is the entry point (what, choose your path, your own data, the docs index); topics live in docs/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move a topic into docs/ and link it"
    headings = [line for line in lines if line.startswith("## ")]
    assert headings[:3] == ["## Choose your path", "## Your own model and data", "## What a run writes"], headings
