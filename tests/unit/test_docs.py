"""The repository's documents: they stand alone (no link or path leaves the repository), the README's first screen
is the make targets a newcomer runs, and the README reads as a manual, not a lab notebook."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {"data", "logs", "outputs", "multirun", "node_modules", "__pycache__"}  # run outputs, not documents

# a markdown link's target, or any path-like word (in backticks or bare) that climbs with ../
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)")
CLIMB = re.compile(r"(?:^|[\s`'\"(\[=:])((?:\.\./)+[^\s`'\")\]]*)")
FILE_URL = re.compile(r"file://\S+")


def markdown_files() -> list[Path]:
    """Every *.md of the repository; hidden folders (.git, .venv) and run outputs are not documents."""
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        found += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".md")]
    return found


def outside_references(path: Path, text: str) -> list[str]:
    """``line: reference`` for each link or path in ``text`` (the document at ``path``) that leaves the repository."""
    bad = []
    for n, line in enumerate(text.splitlines(), 1):
        refs = [m.group(1) for m in LINK.finditer(line)] + [m.group(1) for m in CLIMB.finditer(line)]
        for ref in dict.fromkeys(refs):  # a link that climbs is found by both patterns
            if re.match(r"[a-z][a-z0-9+.-]*://", ref) and not ref.startswith("file://"):
                continue  # a web address is not a path
            target = ref.split("#", 1)[0]
            if not target:
                continue
            if target.startswith(("/", "~", "file:")) or not (path.parent / target).resolve().is_relative_to(ROOT):
                bad.append(f"{n}: {ref}")
        bad += [f"{n}: {m.group(0)}" for m in FILE_URL.finditer(line)]
    return bad


def test_the_scan_sees_links_and_paths_that_leave_the_repository():
    doc = ROOT / "experiments" / "x" / "README.md"  # where it would live; only its folder matters
    text = "\n".join(
        [
            "Notes: `../../../notes/research/fourm.md` (masking).",  # a path in backticks, three levels up
            "See [the design](../../../notes/DESIGN.md).",  # a markdown link
            "[ok](../../README.md), [ok](#layout), [web](https://example.org/a/../b), `../m4_pose/README.md`",
            "[abs](/etc/passwd) and file:///tmp/x",
        ]
    )
    assert outside_references(doc, text) == [
        "1: ../../../notes/research/fourm.md",
        "2: ../../../notes/DESIGN.md",
        "4: /etc/passwd",
        "4: file:///tmp/x",
    ]


def test_no_document_points_outside_the_repository():
    docs = markdown_files()
    assert ROOT / "README.md" in docs and ROOT / "docs" / "architecture.md" in docs
    bad = {str(p.relative_to(ROOT)): refs for p in docs if (refs := outside_references(p, p.read_text()))}
    assert not bad, "documents pointing outside the repository (file -> line: reference):\n" + "\n".join(
        f"  {f} -> {', '.join(refs)}" for f, refs in bad.items()
    )


def make_targets() -> dict[str, str]:
    """``target -> recipe`` of the Makefile's documented targets (those with a ``## help`` text)."""
    targets, current = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if m := re.match(r"^([a-zA-Z_-]+):.*## ", line):
            current = m.group(1)
            targets[current] = ""
        elif line.startswith("\t") and current:
            targets[current] += line.strip() + "\n"
        elif line.strip() == "" or not line.startswith("\t"):
            current = None
    return targets


def first_screen() -> str:
    """The README up to its second level-2 heading: what a newcomer sees before scrolling."""
    text = (ROOT / "README.md").read_text()
    heads = [m.start() for m in re.finditer(r"^## ", text, flags=re.M)]
    assert heads, "README.md has no sections"
    return text[: heads[1] if len(heads) > 1 else len(text)]


def test_readme_first_screen_is_install_smoke_train_test_and_the_venv_python():
    screen, targets = first_screen(), make_targets()
    blocks = re.findall(r"```bash\n(.*?)```", screen, flags=re.S)
    assert blocks, "the README's first screen has no commands"
    commands = [line.split("#")[0].split() for line in blocks[0].splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["make", t] for t in ("install", "smoke", "train", "test")], commands
    for _, target in commands:
        assert target in targets, f"README's first screen runs `make {target}`, which the Makefile does not document"
    assert ".venv/bin/python train.py" in screen and "source .venv/bin/activate" in screen


def test_make_smoke_is_the_smoke_preset_of_the_main_job():
    targets = make_targets()
    assert "train.py experiment=m4_pose debug=smoke" in targets["smoke"]
    assert "train.py experiment=m4_pose" in targets["train"]


@pytest.mark.parametrize(
    "pattern",
    [r"\bdone[- ]when\b", r"\bround\b", r"\b\d[\d,]* tests\b", r"\bissue \d+"],
    ids=["done-when", "round", "test counts", "issue numbers"],
)
def test_readme_reads_as_a_manual_not_a_lab_notebook(pattern):
    text = (ROOT / "README.md").read_text()
    hits = [
        f"{n}: {line.strip()[:100]}" for n, line in enumerate(text.splitlines(), 1) if re.search(pattern, line, re.I)
    ]
    assert not hits, f"README.md: lab-notebook wording ({pattern}):\n" + "\n".join(hits)
