"""The repository's documents stand on their own: every relative link resolves inside the repository, nothing points
outside it, and the code's references to the semantics document name sections that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "semantics.md"


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    keep = (".py", ".md", ".lark", ".toml", ".sh", ".yaml", ".yml", ".cfg", ".txt")
    return [ROOT / f for f in out if f.endswith(keep) and (ROOT / f).is_file()]


def test_nothing_points_outside_the_repository():
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8")
        # the needles are spelled in two pieces so that this file does not match itself
        assert "../" + "shared" not in text, f"{path.relative_to(ROOT)} points outside the repository"
        assert "SEMANTICS" + ".md" not in text, f"{path.relative_to(ROOT)} names a document the repository lacks"


def test_markdown_links_resolve():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("benchmarks/*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # a URL, not a file
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"
            assert ROOT in resolved.parents or resolved == ROOT, f"{path.relative_to(ROOT)} links outside: {target}"


def test_section_references_name_existing_sections():
    sections = set(re.findall(r"^## (\d+)\. ", DOC.read_text(encoding="utf-8"), re.M))
    assert sections == {str(i) for i in range(1, 9)}
    for path in tracked_text_files():
        for ref in re.findall(r"docs/semantics\.md[`)\]]* §(\d+)", path.read_text(encoding="utf-8")):
            assert ref in sections, f"{path.relative_to(ROOT)} refers to §{ref}, which docs/semantics.md lacks"


def test_the_document_cites_the_paper_and_covers_the_topics():
    text = DOC.read_text(encoding="utf-8")
    assert "arXiv:2412.17696" in text and "Richardson" in text
    for topic in ("weighted model count", "✓", "✗", "lattice", "Decompilation", "Numerics", "log1mexp"):
        assert topic in text, topic
