"""The README and docs/: generated pages current, links and anchors alive, commands that parse,
and no citation of a file outside the repository."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


def test_generated_pages_are_current():
    stale = generate.stale()
    assert not stale, f"{', '.join('docs/' + s for s in stale)} out of date: run make docs"


def test_a_stale_page_is_caught(tmp_path, capsys):
    for name, page in generate.PAGES.items():
        (tmp_path / name).write_text(page())
    assert generate.main(["--check", "--docs", str(tmp_path)]) == 0
    page = tmp_path / "configuration.md"
    page.write_text(page.read_text().replace("`max_request_rows`", "`max_rows`"))
    (tmp_path / "metrics.md").unlink()
    assert generate.main(["--check", "--docs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "docs/configuration.md is out of date: run make docs" in err and "docs/metrics.md" in err


def test_configuration_page_lists_every_setting_and_defense():
    from dataclasses import fields

    from purifier.defenses import REGISTRY
    from purifier_server.settings import Settings

    text = (DOCS / "configuration.md").read_text()
    for f in fields(Settings):
        assert f"| `{f.name}` |" in text and f"`PURIFIER_{f.name.upper()}`" in text
    row = next(line for line in text.splitlines() if line.startswith("| `defense` |"))
    assert all(f"`{name}`" in row for name in REGISTRY)


def test_metrics_page_lists_what_the_sidecar_exposes():
    """Every metric family a live registry exposes is on the page, with its type."""
    from prometheus_client import CollectorRegistry

    from purifier_server.metrics import SidecarMetrics

    registry = CollectorRegistry()
    SidecarMetrics(registry)
    text = (DOCS / "metrics.md").read_text()
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{name}` | {family.type} |" in text


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors plus explicit <a id="..."> anchors."""
    text = path.read_text()
    ids = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for line in text.splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m and not line.startswith("#!"):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            ids.add(slug)
    return ids


def _in_code_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w*)\n(.*?)```", text, re.S)


def _prose(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_anchors_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: link to missing {target}"
        if anchor:
            assert anchor in _anchors(path), f"{page.name}: {target}: no such anchor in {path.name}"


def _code_files():
    for top in ("purifier", "server", "tests", "benchmarks", "examples", "deploy", "proto", ".ci"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".sh", ".yaml", ".yml", ".toml", ".proto", "") \
                    and "_proto" not in path.parts and "__pycache__" not in path.parts:
                yield path
    yield from (ROOT / name for name in ("Makefile", "Dockerfile", "pyproject.toml"))


# git's conflict markers (diff3 style included), built so that this file holds none itself
CONFLICT_MARKERS = re.compile("^(?:" + "|".join([re.escape("<" * 7) + " ", re.escape("|" * 7) + " ",
                                                  re.escape(">" * 7) + " ", "=" * 7 + "$"]) + ")", re.M)


def _tracked_text_files():
    """Every file git tracks (untracked ones too, and outside git every file but venvs and builds),
    that reads as text."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
        paths = [ROOT / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if not any(part.startswith((".", "build", "__pycache__"))
                                                       for part in p.relative_to(ROOT).parts)]
    for path in paths:
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if b"\0" not in data[:8192]:
                yield path, data.decode(errors="replace")


def test_no_file_holds_a_merge_conflict_marker():
    """A merge left docs/serving.md with one paragraph twice between conflict markers once; the
    link and generated-page checks did not notice."""
    found = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
             for path, text in _tracked_text_files() for m in CONFLICT_MARKERS.finditer(text)]
    assert not found, f"unresolved merge conflict at {', '.join(found)}"


def test_the_conflict_check_catches_each_marker():
    conflict = "\n".join(["a", "<" * 7 + " HEAD", "b", "|" * 7 + " base", "=" * 7, "c", ">" * 7 + " main", ""])
    assert len(CONFLICT_MARKERS.findall(conflict)) == 4
    assert not CONFLICT_MARKERS.findall("a\n" + "=" * 8 + "\n<< not one\n")


def test_code_cites_only_files_in_the_repository():
    """Docstrings and comments point at docs/*.md sections that exist, never at files outside
    the repository (the design notes the project started from are not shipped)."""
    outside = re.compile(r"REFERENCE\.md|DESIGN\.md|/work/|seeds/")
    design_anchors = _anchors(DOCS / "design.md")
    for path in _code_files():
        if path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT)
        assert not outside.search(text), f"{rel} cites a file outside the repository: {outside.search(text)[0]}"
        for page, anchor in re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", text):
            assert (DOCS / page).is_file(), f"{rel} cites docs/{page}, which does not exist"
            if anchor and page == "design.md":
                assert anchor in design_anchors, f"{rel} cites docs/design.md#{anchor}, which does not exist"


def _purifier_commands(text: str) -> list[str]:
    """Every `purifier ...` command line of the bash blocks (continuation lines joined)."""
    commands = []
    for lang, block in _in_code_blocks(text):
        if lang not in ("bash", "sh"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().rstrip("&").strip()
            if line.startswith("purifier ") and "..." not in line:
                commands.append(line)
    return commands


def _parse(argv: list[str]) -> None:
    from purifier.cli import build_parser
    from purifier_server.settings import add_arguments

    if argv[0] == "serve":
        parser = argparse.ArgumentParser(prog="purifier serve")
        add_arguments(parser)
        parser.parse_args(argv[1:])
    else:
        build_parser().parse_args(argv)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_documented_command_parses(page, capsys):
    """Each `purifier` command in a page names a real subcommand and real flags."""
    for command in _purifier_commands(page.read_text()):
        argv = shlex.split(command)[1:]
        try:
            _parse(argv)
        except SystemExit as e:
            pytest.fail(f"{page.name}: `{command}` does not parse: {capsys.readouterr().err.strip()} ({e})")


def test_the_command_check_catches_a_wrong_flag():
    with pytest.raises(SystemExit):
        _parse(shlex.split("audit --endpoint 127.0.0.1:1 --out x --no-such-flag"))
    with pytest.raises(SystemExit):
        _parse(shlex.split("serve --model m.onnx --max-rows 3"))
