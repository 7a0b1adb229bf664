import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
render_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_results)


def test_render_writes_the_results_page(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "defense.json").write_text(json.dumps({
        "benchmark": "defense", "created": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_model": "X", "affinity": 2, "git_commit": "abc"},
        "tables": [{"title": "T", "columns": ["a", "b"], "rows": [[1, 0.123456], ["x", 12345.6]]}],
    }))
    (results / "raw.json").write_text(json.dumps({"benchmark": "raw"}))  # no tables: skipped
    page = tmp_path / "results.md"
    args = ["--out", str(page), "--results", str(results)]
    assert render_results.main([*args, "--check"]) == 1  # missing
    assert "results.md is out of date: run make docs" in capsys.readouterr().err
    assert render_results.main(args) == 0
    text = page.read_text()
    assert text.startswith("# Results\n") and "## defense\n" in text
    assert "| 1 | 0.1235 |" in text and "| x | 12,346 |" in text and "raw" not in text
    assert render_results.main([*args, "--check"]) == 0
    page.write_text(text.replace("0.1235", "0.2"))
    assert render_results.main([*args, "--check"]) == 1


def test_results_page_and_readme_block_are_current():
    """docs/results.md and the README's serving-cost block are exactly what the committed results
    JSON renders to."""
    assert render_results.main(["--check", "--readme", str(ROOT / "README.md")]) == 0


def test_a_stale_readme_block_is_caught_and_rewritten(tmp_path, capsys):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    block = text[text.index(render_results.README_START):text.index(render_results.README_END)]
    readme.write_text(text.replace(block, block.replace("MemGuard |", "MemGuard (edited) |")))
    page = tmp_path / "results.md"
    page.write_text((ROOT / "docs" / "results.md").read_text())
    args = ["--out", str(page), "--readme", str(readme)]
    assert render_results.main([*args, "--check"]) == 1
    assert "README.md is out of date: run make docs" in capsys.readouterr().err
    assert render_results.main(args) == 0 and readme.read_text() == text
    block = render_results.readme_block(ROOT / "benchmarks" / "results")
    assert "| MemGuard |" in block and "p99" in block  # the defenses and the fairness figure


def test_a_ratio_is_shown_with_its_range_over_the_rounds():
    assert render_results._spread({"r_by_round": [1.52, None, 1.47, 1.5]}, "r") == " (1.47-1.52)"
    assert render_results._spread({"r_by_round": [1.5]}, "r") == ""
    assert render_results._spread({"r_by_round": [1.0, 1.0]}, "r") == ""  # the identity sidecar against itself
    assert render_results._spread({"r": 1.5}, "r") == ""  # results measured before rounds were kept


def test_the_busier_host_is_shown_beside_the_headline_run():
    def doc(identity_cpu, memguard_cpu, commit):
        cells = {f"embedded/sidecar-{d}": {"c1": {"server_cpu_ms_per_request": cpu}}
                 for d, cpu in (("identity", identity_cpu), ("memguard", memguard_cpu))}
        comparisons = {"embedded/sidecar-memguard": {"cpu_ratio_vs_identity_c1": memguard_cpu / identity_cpu,
                                                     "cpu_ratio_vs_identity_c1_by_round": [1.3, 1.75],
                                                     "throughput_vs_identity_c16": 0.66},
                       "embedded/sidecar-identity": {"throughput_ratio_c16": 0.9}}
        return {"cells": cells, "comparisons": comparisons, "machine": {"git_commit": commit}}

    text = render_results.other_host_sentence(doc(0.7, 1.0, "aaa"), doc(1.33, 2.0, "bbb"))
    assert "commit bbb" in text and "1.9x this run's" in text
    assert "MemGuard cost 1.50x (1.30-1.75)" in text and "kept 0.66x of its c16 throughput" in text
    assert "identity sidecar 0.90x of the bare server's" in text
