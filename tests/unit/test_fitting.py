"""`purifier fit-defense`: one command for every defense, from a target directory or from files."""

import json

import numpy as np
import pytest
from strong_secret import SECRET, write_secret

from purifier.cli import main
from purifier.data.records import save_records
from purifier.defenses import load_defense

QUICK = ["--param", "epochs=5"]


def quick(files):
    return [*QUICK, "--secret-file", str(files / "secret.txt")]


@pytest.fixture(scope="module")
def files(digits_target, tmp_path_factory):
    d = tmp_path_factory.mktemp("records")
    for role, name in (("train", "members.npz"), ("reference", "reference.csv")):
        save_records(d / name, *digits_target.role(role))
    write_secret(d / "secret.txt")
    return d


def _fit(*args):
    return main(["fit-defense", *args])


def test_files_and_target_fit_the_same_defense(digits_target, files, tmp_path, capsys):
    common = quick(files)
    assert _fit("memguard", "--target", str(digits_target.directory), "--out", str(tmp_path / "a"), *common) == 0
    assert _fit("memguard", "--model", str(digits_target.onnx_path), "--members", str(files / "members.npz"),
                "--reference", str(files / "reference.csv"), "--out", str(tmp_path / "b" / "nested"), *common) == 0
    printed = capsys.readouterr().out
    assert "defender classifier accuracy" in printed and "noise release rate" in printed
    a, b = (load_defense(p, secret=SECRET, model_id=digits_target.model_id) for p in (tmp_path / "a",
                                                                                      tmp_path / "b" / "nested"))
    assert a.model_id == b.model_id == digits_target.model_id  # the ONNX file's sha256 either way
    for k, v in a.classifier.arrays.items():
        np.testing.assert_array_equal(v, b.classifier.arrays[k])
    np.testing.assert_array_equal(a.fingerprint.probs, b.fingerprint.probs)
    manifest = json.loads((tmp_path / "b" / "nested" / "defense.json").read_text())
    assert manifest["fitted_on"]["member_rows"] == 500 and manifest["fitted_on"]["reference_rows"] == 300
    assert manifest["config"]["epochs"] == 5


def test_a_logits_model_needs_logits(digits_target, files, tmp_path, capsys):
    base = ["--model", str(digits_target.onnx_path), "--members", str(files / "members.npz"), "--reference",
            str(files / "reference.csv"), "--output-name", "logits", *quick(files)]
    assert _fit("memguard", *base, "--out", str(tmp_path / "x")) == 2
    assert "pass --logits" in capsys.readouterr().err
    assert _fit("memguard", *base, "--logits", "--out", str(tmp_path / "y")) == 0
    fp = load_defense(tmp_path / "y", secret=SECRET).fingerprint
    np.testing.assert_allclose(fp.probs, digits_target.predict_proba(fp.inputs), atol=1e-6)  # softmaxed


@pytest.mark.parametrize("case,message", [
    ("exists", "--out: .* already exists; choose a new directory or pass --force"),
    ("param", "--param nope: the memguard defense has no such hyper-parameter; it takes: "),
    ("shortcut", "--label-swap does not apply to the memguard defense"),
    ("shared", "--members .* and --reference .* share 500 record"),
    ("features", "--members .* records have 3 features, the model takes 64"),
    ("classes", r"--reference .* label 12 \(record 0\) is outside the model's classes 0..9"),
    ("no-model", "name the model: --model MODEL.onnx, or --endpoint"),
    ("both", "give either --model .* or --endpoint .*, not both"),
    ("zipless", "is not an .onnx file or a target directory"),
    ("no-secret", r"secret: no PRF secret configured; set .* --secret-file \(e.g. head -c 32 /dev/urandom"),
    ("weak-secret", r"secret: the secret in .* is guessable: .*; make a strong one with head -c 32 /dev/urandom"),
    ("no-op", r"the memguard defense with epsilon=0 \(default 1\), epochs=5 \(default 50\) leaves 256 of 256 reference "
              r"vectors unchanged .*; choose a setting that changes them \(purifier tune memguard"),
])
def test_bad_input_is_one_line_and_writes_nothing(digits_target, files, tmp_path, capsys, monkeypatch, case, message):
    out = tmp_path / "out"
    args = ["memguard", "--model", str(digits_target.onnx_path), "--members", str(files / "members.npz"),
            "--reference", str(files / "reference.csv"), "--out", str(out), *quick(files)]
    if case == "exists":
        out.mkdir()
    elif case == "param":
        args += ["--param", "nope=1"]
    elif case == "shortcut":
        args += ["--label-swap"]
    elif case == "shared":
        args[args.index("--reference") + 1] = str(files / "members.npz")
    elif case == "features":
        save_records(tmp_path / "narrow.npz", np.zeros((4, 3)), np.zeros(4))
        args[args.index("--members") + 1] = str(tmp_path / "narrow.npz")
    elif case == "classes":
        save_records(tmp_path / "c.csv", np.ones((2, 64)), [12, 0])
        args[args.index("--reference") + 1] = str(tmp_path / "c.csv")
    elif case == "no-model":
        args = args[:1] + args[3:]
    elif case == "both":
        args += ["--endpoint", "127.0.0.1:1", "--model-name", "m"]
    elif case == "zipless":
        args[args.index("--model") + 1] = str(files / "members.npz")
    elif case == "no-secret":  # the fitted defense is bound to the served secret: no throwaway one
        monkeypatch.delenv("PURIFIER_SECRET", raising=False)
        monkeypatch.delenv("PURIFIER_SECRET_FILE", raising=False)
        args = args[:-2]
    elif case == "no-op":
        args += ["--epsilon", "0"]
    elif case == "weak-secret":
        (tmp_path / "weak.txt").write_text("changemechangeme\n")
        args[-1] = str(tmp_path / "weak.txt")
    assert _fit(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    import re

    assert re.search(message, err), err
    assert list(tmp_path.glob("out*")) == ([out] if case == "exists" else [])


def test_every_registered_defense_fits_through_the_one_command(digits_target, files, tmp_path):
    """Baselines included: the command knows no defense by name, only the registry."""
    from purifier.defenses import REGISTRY

    for name in [n for n in REGISTRY if n not in ("none", "memguard", "purifier")]:
        out = tmp_path / name
        assert _fit(name, "--model", str(digits_target.onnx_path), "--members", str(files / "members.npz"),
                    "--reference", str(files / "reference.csv"), "--secret-file", str(files / "secret.txt"),
                    "--out", str(out)) == 0, name
        defense = load_defense(out, secret=SECRET, model_id=digits_target.model_id)
        assert defense.name == name and defense.fingerprint is not None
    assert _fit("top_k", "--target", str(digits_target.directory), "--param", "k=2", "--out", str(tmp_path / "k2"),
                "--secret-file", str(files / "secret.txt")) == 0
    assert load_defense(tmp_path / "k2", secret=SECRET).k == 2
