"""The Python fitting snippet of docs/own-model.md runs as printed."""

import re
import shutil
from pathlib import Path

from strong_secret import SECRET, write_secret

from purifier.data.records import save_records
from purifier.defenses import load_defense

PAGE = Path(__file__).resolve().parents[2] / "docs" / "own-model.md"


def snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)
    return next(b for b in blocks if "FitData.from_model" in b)


def test_own_model_fit_snippet_runs(digits_target, tmp_path, monkeypatch):
    shutil.copy(digits_target.onnx_path, tmp_path / "model.onnx")
    save_records(tmp_path / "train.npz", *digits_target.role("train"))
    save_records(tmp_path / "reference.npz", *digits_target.role("reference"))
    write_secret(tmp_path / "secret.txt")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet(), "own-model.md", "exec"), {})
    # save() made the missing build/defenses/ parents; the defense is bound to the ONNX file
    defense = load_defense(tmp_path / "build" / "defenses" / "mine", secret=SECRET,
                           model_id=digits_target.model_id)
    assert defense.name == "memguard" and defense.n_classes == 10
