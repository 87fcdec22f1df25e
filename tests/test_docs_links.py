"""The documentation a user's clone holds links only to itself.

Every relative Markdown link and image in README.md, BENCHMARKS.md, RESULTS.md and
docs/**/*.md resolves to a file or folder inside the repository that git does not
ignore, anchors (``#...``) name a heading of the target page, and no absolute machine
path (``/work/``, ``/root/``, ``/tmp/``) appears anywhere in those pages, code blocks
included. Paths outside the repository (the shared data folder, say) may appear only as
plain text, never as a link.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ["README.md", "BENCHMARKS.md", "RESULTS.md"]

# Absolute paths a page may name because the project itself uses them: path -> the file
# that uses it (checked, so an entry goes stale loudly when the default changes).
ALLOWED_ABSOLUTE = {"/tmp/dist_ast-slurm": "scripts/slurm-local.sh"}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
# [text](dest "title") and ![alt](dest); the text may hold one level of brackets.
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
_HTML_REF = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.I)
_HTML_ID = re.compile(r"<[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_ATX = re.compile(r"^ {0,3}#{1,6}(?:\s+(.*?))?(?:\s+#+)?\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MACHINE_PATH = re.compile(r"(?<![\w.~}$-])/(?:work|root|tmp)/[^\s`'\")\]>]*")


def doc_files() -> list[Path]:
    files = [ROOT / name for name in TOP_LEVEL]
    files += sorted((ROOT / "docs").rglob("*.md"))
    return files


def _strip_code(text: str) -> tuple[str, list[str]]:
    """The page without fenced code blocks and with inline code replaced by its text
    minus brackets (a code span is never a link); also the page's lines outside fences."""
    prose, in_fence = [], None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if in_fence is None and m:
            in_fence = m.group(1)[0] * len(m.group(1))
            prose.append("")
            continue
        if in_fence is not None:
            if line.strip().startswith(in_fence) and not line.strip().strip(in_fence[0]):
                in_fence = None
            prose.append("")
            continue
        prose.append(line)
    joined = "\n".join(prose)
    joined = _INLINE_CODE.sub(lambda m: re.sub(r"[\[\]()<>]", " ", m.group(2)), joined)
    return joined, prose


def links(text: str) -> list[str]:
    """Every link destination of a Markdown page (inline, reference, HTML a/img)."""
    prose, _ = _strip_code(text)
    found = [m.group(1) for m in _INLINE_LINK.finditer(prose)]
    found += [m.group(1) for m in _REF_DEF.finditer(prose)]
    found += [m.group(1) for m in _HTML_REF.finditer(prose)]
    return [d[1:-1] if d.startswith("<") and d.endswith(">") else d for d in found]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation other than
    '-' and '_' dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors a page defines: heading slugs (with GitHub's -1, -2 for repeats) and
    explicit HTML ids."""
    _, lines = _strip_code(text)
    seen: dict[str, int] = {}
    out: set[str] = set()
    for i, line in enumerate(lines):
        m = _ATX.match(line)
        title = (m.group(1) or "") if m else None
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if title is None and line.strip() and not line.lstrip().startswith(("|", "-", "*", ">")):
            if re.fullmatch(r" {0,3}(=+|-+)\s*", nxt):
                title = line.strip()  # setext heading
        if title is None:
            continue
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    out.update(m.group(1) for m in _HTML_ID.finditer(text))
    return out


def _ignored_by_git(path: Path) -> bool:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    r = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", str(path)], capture_output=True
    )
    return r.returncode == 0


def link_problems(page: Path, text: str) -> list[str]:
    """What is wrong with the relative links of ``page`` (empty when nothing is)."""
    problems = []
    root = ROOT.resolve()
    for dest in links(text):
        if not dest or _SCHEME.match(dest) or dest.startswith("//"):
            continue  # external (http:, mailto:, ...)
        path_part, _, anchor = dest.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{dest}: absolute link; link relative to the page")
            continue
        if not path_part:  # an anchor on the page itself
            if anchor not in anchors(text):
                problems.append(f"{dest}: no heading #{anchor} on this page")
            continue
        target = (page.parent / path_part).resolve()
        if not target.is_relative_to(root):
            problems.append(f"{dest}: points outside the repository")
            continue
        if not target.exists():
            problems.append(f"{dest}: no such file in the repository")
            continue
        if _ignored_by_git(target):
            problems.append(f"{dest}: ignored by git, so not in a clone")
            continue
        if anchor and target.suffix == ".md":
            if anchor not in anchors(target.read_text(encoding="utf-8")):
                problems.append(f"{dest}: no heading #{anchor} in {target.relative_to(root)}")
    return problems


def machine_paths(text: str) -> list[str]:
    found = []
    for m in _MACHINE_PATH.finditer(text):
        allowed = [p for p in ALLOWED_ABSOLUTE if m.group(0).startswith(p)]
        if not allowed:
            found.append(m.group(0))
    return found


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", doc_files(), ids=_rel)
def test_relative_links_resolve_inside_the_repository(page: Path) -> None:
    assert page.is_file(), f"{_rel(page)} is missing"
    problems = link_problems(page, page.read_text(encoding="utf-8"))
    assert not problems, f"{_rel(page)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", doc_files(), ids=_rel)
def test_no_absolute_machine_paths(page: Path) -> None:
    found = machine_paths(page.read_text(encoding="utf-8"))
    assert not found, f"{_rel(page)} names machine paths: {found}"


def test_allowed_absolute_paths_are_still_what_the_code_uses() -> None:
    for path, user in ALLOWED_ABSOLUTE.items():
        assert path in (ROOT / user).read_text(encoding="utf-8"), (path, user)


def test_the_pages_do_link() -> None:
    """The checks above are not vacuous: the parser finds the pages' links."""
    readme = links((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "docs/algorithm.md" in [d.partition("#")[0] for d in readme]
    assert "docs/img/demo_sparsity.png" in readme
    assert sum(len(links(p.read_text(encoding="utf-8"))) for p in doc_files()) >= 15


def test_checker_catches_what_a_clone_lacks() -> None:
    """The checker itself, on a page written here."""
    page = ROOT / "_probe.md"  # never written: link_problems reads only `text`
    text = (
        "# Title\n\n## The `spec`, §1\n\n"
        "The spec is [`DESIGN.md` §1](../shared/DESIGN.md); "
        "also [up](../main/../../outside.md), [abs](/etc/passwd), [gone](missing.md), "
        "[bad anchor](docs/data.md#no-such-heading), [self](#no-such-heading), "
        "[ok](#the-spec-1) [ok](docs/data.md) ![img](docs/img/demo_gc.png) "
        "[web](https://example.org/x) [ignored](runs/demo/summary.json)\n\n"
        "```bash\n[not a link](../shared/in_code.md) /tmp/x\n```\n"
        "`[code](../shared/code.md)` and /work/shared/data\n"
    )
    problems = link_problems(page, text)
    flagged = sorted(p.split(":")[0] for p in problems)
    assert flagged == sorted(
        [
            "../shared/DESIGN.md",
            "../main/../../outside.md",
            "/etc/passwd",
            "missing.md",
            "docs/data.md#no-such-heading",
            "#no-such-heading",
            "runs/demo/summary.json",
        ]
    ), problems
    assert {"title", "the-spec-1"} <= anchors(text)
    assert machine_paths(text) == ["/tmp/x", "/work/shared/data"]
    assert machine_paths("see runs/tmp/x and $TMPDIR/tmp/y, ./tmp/z") == []
