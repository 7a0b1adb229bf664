import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
render_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_results)


def test_render_splices_tables_between_markers(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "defense.json").write_text(json.dumps({
        "benchmark": "defense", "created": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_model": "X", "affinity": 2, "git_commit": "abc"},
        "tables": [{"title": "T", "columns": ["a", "b"], "rows": [[1, 0.123456], ["x", 12345.6]]}],
    }))
    (results / "raw.json").write_text(json.dumps({"benchmark": "raw"}))  # no tables: skipped
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    assert render_results.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert render_results.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert "| 1 | 0.1235 |" in text and "| x | 12,346 |" in text and "old" not in text
    assert text.startswith("intro\n") and text.endswith("outro\n") and "raw" not in text
    assert render_results.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0


def test_readme_results_are_current():
    """The README's Results section is exactly what the committed results JSON renders to."""
    assert render_results.main(["--check"]) == 0
