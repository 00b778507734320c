"""Every `§` citation in the package, its tests, tools and launch scripts resolves in the
specification the package ships, ds_lowrank/docs/algorithms.md: the section, and the steps,
items and invariant labels a citation or a test name carries."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "ds_lowrank" / "docs"
SPEC = DOCS / "algorithms.md"
SCANNED = ("ds_lowrank", "tests", "tools", "launch", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".json", ".toml", ".sh", ".txt", ".yaml", ".yml", ".cfg"}

# "## 1. LDAdam", "### 1(b) One step"
HEADING = re.compile(r"^(#{1,6})[ \t]+(\d+)(?:\(([a-z])\))?(?=[.\s])", re.M)
# "algorithms.md §1(b)", "``algorithms.md`` §3(b) step 4", "§1(b) steps 4–6", "§3(d) 1",
# "§7, common 1–8"; the document may be named just before the sign, possibly on the line above
CITATION = re.compile(
    r"(?:(?P<doc>[\w./-]+\.md)`{0,2}\s*)?"
    r"§(?P<num>\d+)(?:\((?P<sub>[a-z])\))?"
    r"(?:,?[ \t]+(?:(?P<kind>steps?|common)[ \t]+)?"
    r"(?P<first>\d+)(?:[ \t]*[–-][ \t]*(?P<last>\d+))?(?![\w(]|\.\d))?"
)
ITEM = re.compile(r"^[ \t]*(\d+)\.[ \t]", re.M)
LABEL_DEFINED = re.compile(r"\*\*([LMAG]\d+)\*\*")
LABEL_RANGE = re.compile(r"\b([LMAG])(\d+)[ \t]*[–-][ \t]*\1(\d+)\b")
LABELLED_TEST = re.compile(r"^def test_([LMAG]\d+)_", re.M)
NUMBERED_TEST = re.compile(r"^def test_((?:\d+_)+)", re.M)


def sections(text: str) -> dict[str, str]:
    """Section id ("1", "1(b)") -> its text up to the next heading of the same or a higher level."""
    heads = list(HEADING.finditer(text))
    out = {}
    for i, h in enumerate(heads):
        level = len(h.group(1))
        end = next((n.start() for n in heads[i + 1:] if len(n.group(1)) <= level), len(text))
        key = h.group(2) + (f"({h.group(3)})" if h.group(3) else "")
        assert key not in out, f"{SPEC.name}: section {key} has two headings"
        out[key] = text[h.start():end]
    return out


def scanned_files():
    for name in SCANNED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for f in files:
            if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts:
                yield f


def citations():
    """(where, document, section, kind, first, last) for every citation found."""
    for f in scanned_files():
        text = f.read_text(encoding="utf-8")
        for c in CITATION.finditer(text):
            line = text.count("\n", 0, c.start("num")) + 1
            doc = Path(c.group("doc")).name if c.group("doc") else SPEC.name
            section = c.group("num") + (f"({c.group('sub')})" if c.group("sub") else "")
            first = int(c.group("first")) if c.group("first") else None
            last = int(c.group("last")) if c.group("last") else first
            yield (f"{f.relative_to(ROOT)}:{line}", doc, section, c.group("kind"), first, last)


def test_the_spec_ships_inside_the_package():
    assert SPEC.is_file()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'ds_lowrank\s*=\s*\[[^\]]*"docs/\*\.md"', pyproject), \
        "pyproject.toml's package data must include ds_lowrank/docs/*.md"


def test_every_citation_resolves():
    found = list(citations())
    # the scan must see the package's and the tests' citations (a broken pattern finds none)
    assert sum(not where.startswith("ds_lowrank/docs/") for where, *_ in found) >= 15
    specs = {p.name: sections(p.read_text(encoding="utf-8")) for p in DOCS.glob("*.md")}
    dangling = []
    for where, doc, section, kind, first, last in found:
        if doc not in specs:
            dangling.append(f"{where}: {doc} §{section}: the package ships no {doc} (ds_lowrank/docs/)")
            continue
        body = specs[doc].get(section)
        if body is None:
            dangling.append(f"{where}: {doc} has no section {section}")
            continue
        if first is not None:
            items = {int(n) for n in ITEM.findall(body)}
            missing = [n for n in range(first, last + 1) if n not in items]
            if missing:
                what = kind or "item"
                dangling.append(f"{where}: {doc} §{section} has no {what} {missing}")
    assert not dangling, "dangling citations:\n" + "\n".join(dangling)


def test_every_invariant_label_is_specified():
    """Invariant labels in test names (test_L3_…, test_2_3_…) and ranges (L1–L9) are items of §7."""
    invariants = sections(SPEC.read_text(encoding="utf-8"))["7"]
    defined = set(LABEL_DEFINED.findall(invariants))
    common = {int(n) for n in ITEM.findall(sections(SPEC.read_text(encoding="utf-8"))["7(a)"])}
    missing = []
    for f in scanned_files():
        if f == SPEC:
            continue
        text = f.read_text(encoding="utf-8")
        used = set(LABELLED_TEST.findall(text))
        for letter, lo, hi in LABEL_RANGE.findall(text):
            used |= {f"{letter}{n}" for n in range(int(lo), int(hi) + 1)}
        missing += [f"{f.relative_to(ROOT)}: invariant {lb}" for lb in sorted(used - defined)]
        for numbers in NUMBERED_TEST.findall(text):
            missing += [f"{f.relative_to(ROOT)}: common invariant {n}"
                        for n in map(int, numbers.strip("_").split("_")) if n not in common]
    assert defined, "§7 defines no invariant labels"
    assert not missing, "labels not specified in §7:\n" + "\n".join(sorted(set(missing)))


def test_the_readme_links_the_spec():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert any((ROOT / t).resolve() == SPEC.resolve() for t in targets), \
        "README.md must link ds_lowrank/docs/algorithms.md, the specification the code cites"
