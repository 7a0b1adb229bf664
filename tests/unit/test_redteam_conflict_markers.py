"""Red-team: docs/serving.md on main carries an unresolved merge conflict (the "Bounded"
paragraph twice, between conflict markers), which the docs tests (links, anchors, generated pages)
do not notice. Expected: no file of the repository holds a conflict marker."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKERS = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")


def test_no_file_holds_a_merge_conflict_marker():
    found = []
    for pattern in ("*.md", "docs/**/*.md", "purifier/**/*.py", "server/**/*.py", "tests/**/*.py",
                    "benchmarks/**/*.py", "deploy/**/*", "examples/**/*.py"):
        for path in ROOT.glob(pattern):
            if not path.is_file():
                continue
            lines = path.read_text(errors="replace").splitlines(keepends=True)
            found += [f"{path.relative_to(ROOT)}:{i + 1}" for i, line in enumerate(lines)
                      if line.startswith(MARKERS[0]) or line.startswith(MARKERS[2]) or line == MARKERS[1]]
    assert not found, f"unresolved merge conflict at {', '.join(found)}"
