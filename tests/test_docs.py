"""The documentation stands alone: every docs/ reference in the repository resolves to a page and a
heading of that page, the index lists exactly the pages there are, and nothing cites a file
outside the repository (docs/reference.md is the technical reference)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Where references to docs/ pages live: code, tests, benchmarks, recipes and the top-level files.
SOURCES = ["eqm", "eqmctl", "tests", "benchmarks", "recipes", "docs", "README.md", "pyproject.toml", "Makefile"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ""}


def _files():
    for name in SOURCES:
        p = ROOT / name
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in SUFFIXES and "__pycache__" not in f.parts)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    seen: dict = {}
    out = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = _slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def references():
    """(file, line number, target page, anchor or None) for every docs/ page a file refers to."""
    code_ref = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
    link = re.compile(r"\]\(([^)#\s]*?\.md)?(?:#([^)\s]+))?\)")
    for f in _files():
        if f == Path(__file__).resolve():
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if f.parent == DOCS and f.suffix == ".md":
                for m in link.finditer(line):
                    if m.group(1) and "://" in m.group(1):
                        continue
                    target = (f.parent / m.group(1)).resolve() if m.group(1) else f
                    yield f, i, target, m.group(2)
            else:
                for m in code_ref.finditer(line):
                    yield f, i, DOCS / m.group(1), m.group(2)
                if f.name == "README.md":
                    for m in link.finditer(line):
                        if m.group(1) and m.group(1).startswith("docs/"):
                            yield f, i, (ROOT / m.group(1)).resolve(), m.group(2)


def test_every_docs_reference_resolves():
    bad = []
    cache: dict = {}
    for f, i, target, anchor in references():
        where = f"{f.relative_to(ROOT)}:{i}"
        if not target.is_file():
            bad.append(f"{where}: no page {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
            continue
        if anchor is not None:
            if target not in cache:
                cache[target] = anchors(target)
            if anchor not in cache[target]:
                bad.append(f"{where}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert not bad, "\n".join(bad)


def test_nothing_cites_a_file_outside_the_repository():
    outside = re.compile(r"\bSPEC\b|shared/|ARCHITECTURE\.md")
    hits = [
        f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
        for f in _files() if f != Path(__file__).resolve()
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_docs_index_lists_exactly_the_pages_that_exist():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"\]\(([\w.-]+\.md)\)", index))
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert listed == pages, f"docs/README.md lists {sorted(listed - pages)} that do not exist, misses {sorted(pages - listed)}"


@pytest.mark.parametrize("heading, slug", [
    ("Time-aware encoding", "time-aware-encoding"),
    ("The sincos channel layout (`model.time.order`)", "the-sincos-channel-layout-modeltimeorder"),
    ("Choosing ref_fps", "choosing-ref_fps"),
    ("Trained longer (8000 steps): all three seeds meet the target", "trained-longer-8000-steps-all-three-seeds-meet-the-target"),
])
def test_anchor_rule_matches_github(heading, slug):
    assert _slug(heading) == slug
