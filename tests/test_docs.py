"""The documentation stands on its own: every page and section the repository cites exists in the repository.

Checked over src/, tests/, docs/, configs/, scripts/, benchmarks/, README.md, Makefile and pyproject.toml:

- a mention of ``docs/<name>.md`` names a page in docs/; a bare ``<name>.md`` names a page in docs/ or a file at
  the repository root, or one of the report files embedrl writes (``OUTPUT_FILES``);
- a section reference after a page name (``docs/method.md §4.5–4.8, §6.1, §8.23``, ``method.md §8 item 19``,
  ``§1.3 invariant 4``) names a numbered heading of that page, or, for a section without numbered sub-headings
  (method.md §8), one of its numbered list items;
- nothing points at a folder outside the repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED_DIRS = ("src", "tests", "docs", "configs", "scripts", "benchmarks")
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg", ".ini", ".jinja"}
# Published data kept verbatim, and shipped checkpoints: not documentation, never rewritten.
SKIPPED = ("tests/fixtures", "src/embedrl/resources")
# Markdown files embedrl writes into its output directories (not pages of the docs).
OUTPUT_FILES = {"summary.md", "report.md", "samples.md"}
# Folders a clone of the repository does not have; spelled in pieces so that this file does not match its own check.
OUTSIDE = tuple("".join(parts) for parts in (("..", "/shared"), ("shared", "/docs"), ("shared", "/fixtures")))

DOC_NAME = re.compile(r"(?<![\w./-])(?P<prefix>docs/)?(?P<name>\w[\w-]*)\.md\b")
NUMBER = r"\d+(?:\.\d+)*"
GAP = r"[\s#`)]*"  # between a page name and its first section: spaces, comment marks, closing backtick or bracket
FIRST = re.compile(GAP + r"\(?\s*§(?P<num>" + NUMBER + ")")
QUALIFIER = re.compile(r"\s+(?:items?|invariants?)\s+(?P<items>\d+(?:\s*(?:,|and)\s*\d+)*)")
RANGE = re.compile(r"\s*[–-]\s*§?(?P<num>" + NUMBER + r")(?![\w.-]*\w)")
LIST = re.compile(r"\s*(?:,|;|/|\band\b)\s*§(?P<num>" + NUMBER + ")")


@dataclass(frozen=True)
class SectionRef:
    number: str
    item: int | None = None  # "§8 item 19", "§1.3 invariant 4"


@dataclass
class Page:
    headings: set[str] = field(default_factory=set)
    items: dict[str, set[int]] = field(default_factory=dict)  # heading number -> numbered list items below it

    def resolves(self, ref: SectionRef) -> bool:
        if ref.item is not None:
            return ref.number in self.headings and ref.item in self.items.get(ref.number, set())
        if ref.number in self.headings:
            return True
        parent, _, last = ref.number.rpartition(".")
        has_sub_headings = any(h.startswith(parent + ".") for h in self.headings)
        return bool(parent) and not has_sub_headings and int(last) in self.items.get(parent, set())


def read_page(path: Path) -> Page:
    page, current, fenced = Page(), None, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if m := re.match(r"#{1,6}\s+(" + NUMBER + r")\.?\s", line):
            current = m.group(1)
            page.headings.add(current)
        elif current and (m := re.match(r"(\d+)\.\s", line)):
            page.items.setdefault(current, set()).add(int(m.group(1)))
    return page


def section_refs(text: str, start: int) -> list[SectionRef]:
    """The section references that follow a page name ending at ``start``, e.g. `` §4.5–4.8, §8 item 19``."""
    m = FIRST.match(text, start)
    if not m:
        return []
    refs, pos, last = [], m.end(), m.group("num")
    refs.append(SectionRef(last))
    while True:
        if q := QUALIFIER.match(text, pos):
            refs.pop()
            refs += [SectionRef(last, int(i)) for i in re.findall(r"\d+", q.group("items"))]
            pos = q.end()
        elif r := RANGE.match(text, pos) or LIST.match(text, pos):
            last = r.group("num")
            refs.append(SectionRef(last))
            pos = r.end()
        else:
            return refs


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for folder in SCANNED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if (
                path.is_file()
                and path.suffix in TEXT_SUFFIXES
                and not rel.startswith(SKIPPED)
                and "__pycache__" not in path.parts
                and not any(part.endswith(".egg-info") for part in path.parts)
            ):
                files.append(path)
    return files


def references(path: Path) -> list[tuple[int, str, str, list[SectionRef]]]:
    """(line, how the page was named, page file name, section references) for every page name in ``path``."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in DOC_NAME.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group(0), m.group("name") + ".md", section_refs(text, m.end())))
    return out


def page_exists(path: Path, spelled: str, name: str) -> bool:
    if spelled.startswith("docs/"):
        return (DOCS / name).is_file()
    return (DOCS / name).is_file() or (ROOT / name).is_file() or name in OUTPUT_FILES


def test_the_reference_parser_reads_every_form() -> None:
    text = (
        "see docs/method.md §4.5–4.8, §6.1, §8.23 and §8 item 19; `benchmarks.md` (§1.6) or method.md §1.3 invariant 4"
    )
    found = {spelled: refs for _, spelled, _, refs in references_in(text)}
    assert found["docs/method.md"] == [
        SectionRef("4.5"),
        SectionRef("4.8"),
        SectionRef("6.1"),
        SectionRef("8.23"),
        SectionRef("8", 19),
    ]
    assert found["benchmarks.md"] == [SectionRef("1.6")]
    assert found["method.md"] == [SectionRef("1.3", 4)]
    assert references_in("docs/rl.md describes it, §4 of the paper") == [(1, "docs/rl.md", "rl.md", [])]
    assert [r for *_, r in references_in("method.md §5.2–§5.9 and §3.1-3.3; runs/x/report.md")] == [
        [SectionRef("5.2"), SectionRef("5.9"), SectionRef("3.1"), SectionRef("3.3")]
    ]


def references_in(text: str) -> list[tuple[int, str, str, list[SectionRef]]]:
    return [(1, m.group(0), m.group("name") + ".md", section_refs(text, m.end())) for m in DOC_NAME.finditer(text)]


def test_pages_resolve_numbered_items_only_where_a_section_has_no_sub_headings(tmp_path: Path) -> None:
    md = tmp_path / "page.txt"
    md.write_text("## 1. A\n### 1.1 B\n1. one\n## 2. C\n1. first\n2. second\n```\n## 3. not a heading\n```\n")
    page = read_page(md)
    assert page.resolves(SectionRef("1.1")) and page.resolves(SectionRef("2.2")) and page.resolves(SectionRef("2", 1))
    assert not page.resolves(SectionRef("1.2")) and not page.resolves(SectionRef("2.3"))
    assert not page.resolves(SectionRef("3")) and page.resolves(SectionRef("1.1", 1))


def test_every_cited_page_exists() -> None:
    missing = [
        f"{path.relative_to(ROOT)}:{line}: {spelled}"
        for path in scanned_files()
        for line, spelled, name, _ in references(path)
        if not page_exists(path, spelled, name)
    ]
    assert not missing, "pages cited but not in the repository:\n" + "\n".join(missing)


def test_every_cited_section_exists() -> None:
    pages = {p.name: read_page(p) for p in DOCS.glob("*.md")}
    unresolved = []
    for path in scanned_files():
        for line, spelled, name, refs in references(path):
            page = pages.get(name)
            for ref in refs:
                if page is None or not page.resolves(ref):
                    what = f"§{ref.number}" + (f" item {ref.item}" if ref.item is not None else "")
                    unresolved.append(f"{path.relative_to(ROOT)}:{line}: {spelled} {what}")
    assert not unresolved, "section references without a heading or item:\n" + "\n".join(unresolved)


@pytest.mark.parametrize(("page", "top"), [("method.md", range(10)), ("benchmarks.md", range(1, 6))])
def test_the_reference_pages_keep_their_numbering(page: str, top: range) -> None:
    assert {str(n) for n in top} <= read_page(DOCS / page).headings


def test_nothing_points_outside_the_repository() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {needle}"
        for path in scanned_files()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for needle in OUTSIDE
        if needle in line
    ]
    assert not hits, "paths that a clone of this repository does not have:\n" + "\n".join(hits)
