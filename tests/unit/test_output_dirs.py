"""`--out DIR --force` replaces an earlier output of the same command, never a directory of other
files (issue 21, item 8: `audit --out DIR --force` deleted unrelated files)."""

import pytest

from purifier.artifacts import new_output_dir
from purifier.cli import main
from purifier.errors import ConfigError


@pytest.mark.parametrize("command,marker", [
    (["audit", "--target", "nowhere"], "report.json"),
    (["tune", "memguard", "--target", "nowhere"], "tune.json"),
    (["fit-defense", "memguard", "--target", "nowhere"], "defense.json"),
])
def test_force_does_not_replace_a_directory_of_other_files(command, marker, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert main([*command, "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"holds other files (e.g. thesis.tex) and no {marker}" in err and len(err.splitlines()) == 1
    assert (out / "thesis.tex").read_text() == "years of work"


def test_force_replaces_an_earlier_output_or_an_empty_directory(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text("{}")
    (earlier / "roc.png").write_bytes(b"")
    assert new_output_dir(earlier, True, "report.json") == earlier
    (tmp_path / "empty").mkdir()
    assert new_output_dir(tmp_path / "empty", True, "report.json") == tmp_path / "empty"
    with pytest.raises(ConfigError, match="already exists; choose a new directory or pass --force"):
        new_output_dir(earlier, False, "report.json")
