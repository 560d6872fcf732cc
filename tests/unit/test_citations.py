"""Every document the code cites is in the repository, and every cited section of it exists.

Citations name a file under docs/ and, optionally, numbered sections or headings of it, on one line:
``docs/platform-notes.md §5, §10`` (a heading that starts with ``§5``) or
``docs/torl-behaviour.md ("Reward and grading", "Evaluation")`` (headings with exactly that text).
A reader of a fresh clone has only the repository, so pointers to notes kept outside it are errors too.
Not here: whether the cited text says what the comment claims.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ("torl", "actors", "jobs", "bench", "scripts", "configs", "tests", "docs")
SCANNED_ROOT_FILES = ("README.md", "pyproject.toml")
SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".md", ".toml", ".txt", ".cfg", ".ini"}
THIS_FILE = Path(__file__).resolve()  # its docstring and patterns spell out the forms it checks

# docs/<file>.md, optional closing backticks (``docs/x.md``), then optional " §N[, §M...]" or ' ("A"[, "B"...])'.
CITATION = re.compile(
    r"docs/(?P<file>[\w.-]+\.md)`*"
    r"(?:[ \t]+§(?P<sections>\d+(?:,[ \t]*§\d+)*)|[ \t]+\((?P<headings>\"[^\"\n]+\"(?:,[ \t]*\"[^\"\n]+\")*)\))?"
)
# A citation broken over two lines (the section part would go unchecked): docs/x.md at a line's end, § or (" next.
SPLIT_CITATION = re.compile(r"docs/[\w.-]+\.md`*[ \t]*\n[ \t]*(?:#+|//)?[ \t]*(?:§|\(\")")
# Pointers to documents outside the repository, however they are spelled. Matched on the lower-cased text; a match
# right after "docs/" is a citation of the repository's own copy. (Patterns start with a literal: they stay fast.)
OUTSIDE = (
    (re.compile(r"notes\s+§"), "platform notes cited without docs/platform-notes.md"),
    (re.compile(r"torl[-_ ]behaviou?r"), "ToRL behaviour cited without docs/"),
    (re.compile(r"style\.md"), "STYLE.md is not part of the repository"),
    (re.compile(r"reference/[\w.-]+\.md"), "reference/*.md is not part of the repository"),
    (re.compile(r"\.\./shared/(?!data\b)"), "../shared is not part of the repository (only ../shared/data is)"),
    (re.compile(r"shared/(?:reference|style)"), "../shared is not part of the repository"),
)
HEADING = re.compile(r"^#{1,6}[ \t]+(?P<text>.+?)[ \t]*#*[ \t]*$")
FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})[\w+-]*[ \t]*$")  # a fence line: ```, ```python, ~~~


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_ROOT_FILES if (ROOT / name).is_file()]
    for top in SCANNED_DIRS:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return sorted(p for p in files if p.resolve() != THIS_FILE and "__pycache__" not in p.parts)


def headings(markdown: str) -> list[str]:
    """The text of every markdown heading outside fenced code blocks."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            out.append(m.group("text"))
    return out


def doc_index(docs_dir: Path) -> dict[str, tuple[set[str], set[str]]]:
    """{file name: (section numbers, heading texts)} for each markdown file in ``docs_dir``."""
    index = {}
    for path in docs_dir.glob("*.md"):
        texts = headings(path.read_text(encoding="utf-8"))
        numbers = {m.group(1) for t in texts if (m := re.match(r"§(\d+)\b", t))}
        index[path.name] = (numbers, set(texts))
    return index


def check_text(text: str, where: str, index: dict[str, tuple[set[str], set[str]]]) -> tuple[list[str], int]:
    """(problems, number of citations) for one file's text; ``where`` prefixes each problem."""
    problems = []

    def at(pos: int) -> str:
        return f"{where}:{text.count(chr(10), 0, pos) + 1}"

    found = 0
    for m in CITATION.finditer(text):
        found += 1
        name = m.group("file")
        if name not in index:
            problems.append(f"{at(m.start())}: {m.group(0)!r}: docs/{name} does not exist")
            continue
        numbers, texts = index[name]
        for n in re.findall(r"\d+", m.group("sections") or ""):
            if n not in numbers:
                problems.append(f"{at(m.start())}: {m.group(0)!r}: docs/{name} has no section §{n}")
        for h in re.findall(r"\"([^\"]+)\"", m.group("headings") or ""):
            if h not in texts:
                problems.append(f"{at(m.start())}: {m.group(0)!r}: docs/{name} has no heading {h!r}")
    for m in SPLIT_CITATION.finditer(text):
        problems.append(f"{at(m.start())}: citation split across lines; keep it on one line: {m.group(0)!r}")
    lowered = text.lower()
    if len(lowered) != len(text):  # a character whose lower case is longer: keep positions aligned with text
        lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    for pattern, why in OUTSIDE:
        for m in pattern.finditer(lowered):
            if not lowered.endswith("docs/", 0, m.start()):
                problems.append(f"{at(m.start())}: {text[m.start() : m.end()]!r}: {why}")
    return problems, found


def test_every_citation_resolves_inside_the_repository():
    index = doc_index(ROOT / "docs")
    problems, found = [], 0
    for path in scanned_files():
        p, n = check_text(path.read_text(encoding="utf-8", errors="replace"), str(path.relative_to(ROOT)), index)
        problems += p
        found += n
    assert not problems, "broken or outside-the-repo citations:\n" + "\n".join(problems)
    assert found >= 20, f"only {found} citations found: has the citation pattern stopped matching?"


def test_the_checker_catches_broken_citations(tmp_path):
    (tmp_path / "notes.md").write_text("# Notes\n\n## §1 One\n\n## §3 Three\n\n```\n## Not a heading\n```\n## Two\n")
    index = doc_index(tmp_path)
    good = 'see docs/notes.md §1, §3 and ``docs/notes.md`` ("Two") and docs/notes.md ("Two", "§3 Three")'
    assert check_text(good, "x", index) == ([], 3)
    bad = {
        "docs/notes.md §2": "no section §2",
        "docs/notes.md §1, §4": "no section §4",
        'docs/notes.md ("Three")': "no heading 'Three'",
        'docs/notes.md ("Not a heading")': "no heading",
        "docs/missing.md §1": "does not exist",
        "# see docs/notes.md\n# §1": "split across lines",
        "(platform notes §10)": "platform notes",
        "(notes §9)": "platform notes",
        "reference/torl-behaviour.md §1(b)": "ToRL behaviour",
        "(torl-behaviour §1(b) step 5)": "ToRL behaviour",
        "(STYLE.md rule 1)": "STYLE.md",
        "see ../shared/reference/x.md": "../shared",
    }
    for text, expected in bad.items():
        problems, _ = check_text(text, "x", index)
        assert any(expected in p for p in problems), (text, problems)
    assert check_text("data in ../shared/data beside the repo; ToRL paper §3.3", "x", index) == ([], 0)
