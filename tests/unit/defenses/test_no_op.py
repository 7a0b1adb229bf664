"""A defense that does nothing is refused: when it is fitted (saved), when a fitted directory is
loaded (what `purifier serve` does), and when `purifier tune --write-to` would write such a setting.
One rule for every defense: applied to the reference rows it was fitted on, it must change more
than 1% of them at float32."""

import json

import numpy as np
import pytest
from strong_secret import SECRET

from purifier.defenses import FitData, IdentityDefense, defense_class, load_defense
from purifier.defenses.no_op import (
    NO_OP_SHARE,
    SAMPLE_FILE,
    SAMPLE_ROWS,
    changed_settings,
    unchanged_rows,
)
from purifier.errors import ConfigError

NO_OPS = [
    ("memguard", {"epsilon": 0.0, "epochs": 2}, "epsilon=0 (default 1)"),
    ("memguard", {"epsilon": 1e-12, "epochs": 2}, "epsilon=1e-12 (default 1)"),
    ("top_k", {"k": 10}, "k=10 (default 3)"),
    ("round", {"decimals": 15}, "decimals=15 (default 1)"),
    ("noise", {"scale": 0.0}, "scale=0 (default 0.05)"),
    ("noise", {"kind": "gaussian", "scale": 0}, "scale=0 (default 0.05)"),
]


@pytest.fixture(scope="module")
def digits_fit(digits_target):
    return FitData.from_target(digits_target)


@pytest.mark.parametrize("name,config,named", NO_OPS, ids=[f"{n}-{c}" for n, c, _ in NO_OPS])
def test_a_setting_that_changes_nothing_is_refused_when_fitted(name, config, named, digits_fit, tmp_path):
    defense = defense_class(name)(**config, secret=SECRET).fit(digits_fit)
    assert unchanged_rows(defense, defense.reference_sample.probs).mean() >= NO_OP_SHARE
    with pytest.raises(ConfigError) as e:
        defense.save(tmp_path / "d")
    message = str(e.value)
    assert named in message and f"of {SAMPLE_ROWS} reference vectors unchanged" in message, message
    assert f"purifier tune {name}" in message and "--defense none" in message and "\n" not in message
    assert not (tmp_path / "d").exists() and list(tmp_path.iterdir()) == []


def test_a_directory_that_changes_nothing_is_refused_when_loaded(digits_fit, tmp_path):
    defense_class("top_k")(k=3, secret=SECRET).fit(digits_fit).save(tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / "defense.json").read_text())
    assert manifest["reference_sample"]["rows"] == SAMPLE_ROWS and SAMPLE_FILE in manifest["files"]
    assert load_defense(tmp_path / "d", SECRET).k == 3
    manifest["config"]["k"] = 10  # e.g. edited by hand
    (tmp_path / "d" / "defense.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"the top_k defense with k=10 \(default 3\) leaves 256 of 256 .* refit it "
                                          r"with a setting that changes them, or write one into it with purifier tune "
                                          r"top_k --write-to"):
        load_defense(tmp_path / "d", SECRET)
    # directories fitted before the sample existed fall back to their fingerprint's rows
    del manifest["reference_sample"], manifest["files"][SAMPLE_FILE]
    (tmp_path / "d" / SAMPLE_FILE).unlink()
    (tmp_path / "d" / "defense.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"leaves (\d+) of \1 reference vectors unchanged"):
        load_defense(tmp_path / "d", SECRET)
    # the setting that tune --write-to is about to write is checked the same way
    assert load_defense(tmp_path / "d", SECRET, config={"k": 2}).k == 2


def test_the_sample_is_hash_checked(digits_fit, tmp_path):
    defense_class("round")(decimals=2, secret=SECRET).fit(digits_fit).save(tmp_path / "d")
    sample = np.load(tmp_path / "d" / SAMPLE_FILE)["probs"]
    np.savez(tmp_path / "d" / SAMPLE_FILE, probs=np.round(sample, 2))  # a sample the rule would pass anything on
    with pytest.raises(Exception, match="sha256"):
        load_defense(tmp_path / "d", SECRET)


def test_none_is_exempt_because_it_is_chosen_by_name(digits_fit, tmp_path):
    IdentityDefense().fit(digits_fit).save(tmp_path / "none")
    assert load_defense(tmp_path / "none").name == "none"


def test_unchanged_means_within_one_float32_step():
    p = np.random.default_rng(0).dirichlet(np.ones(5) * 0.05, size=100)  # confident rows: entries down to 1e-20
    assert (p.min(axis=1) < 1e-9).mean() > 0.5
    for decimals, unchanged in ((15, True), (8, True), (7, True), (6, False), (3, False)):
        d = defense_class("round")(decimals=decimals)
        d.n_classes = 5
        assert bool(unchanged_rows(d, p).mean() >= NO_OP_SHARE) == unchanged, decimals
    assert changed_settings(d) == "decimals=3 (default 1)" and changed_settings(defense_class("round")()) == \
        "its default settings"


def test_logits_on_an_output_that_holds_probabilities_is_refused_at_fit(digits_target, tmp_path, capsys):
    from strong_secret import write_secret

    from purifier.cli import main

    secret = write_secret(tmp_path / "secret")
    base = ["fit-defense", "round", "--model", str(digits_target.onnx_path), "--secret-file", str(secret)]
    files = []
    for role in ("train", "reference"):
        from purifier.data.records import save_records

        files.append(save_records(tmp_path / f"{role}.npz", *digits_target.role(role)))
    base += ["--members", str(files[0]), "--reference", str(files[1])]
    assert main([*base, "--logits", "--out", str(tmp_path / "p")]) == 2  # the default output: probabilities
    err = capsys.readouterr().err
    assert "already answers probability vectors" in err and "drop --logits" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()
    assert main([*base, "--logits", "--output-name", "logits", "--out", str(tmp_path / "l")]) == 0


def test_a_no_op_written_by_hand_is_refused_even_without_sample_and_fingerprint(digits_fit, tmp_path):
    """The rule must not be skippable by deleting its evidence: scale 0 written into defense.json
    with the reference sample and fingerprint dropped from the directory and the manifest (no
    hash left to recompute) is refused, naming purifier fit-defense."""
    directory = tmp_path / "noise"
    defense_class("noise")(scale=0.05, secret=SECRET).fit(digits_fit).save(directory)
    manifest = json.loads((directory / "defense.json").read_text())
    manifest["config"]["scale"] = 0.0
    for key in ("reference_sample", "fingerprint"):
        entry = manifest.pop(key)
        manifest["files"].pop(entry["file"])
        (directory / entry["file"]).unlink()
    (directory / "defense.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"lists no reference sample \(nor fingerprint\) to check that the noise "
                                          r"defense changes .* refit it with purifier fit-defense noise"):
        load_defense(directory, SECRET)
    manifest["config"]["scale"] = 0.05  # whatever the setting: a directory without its rows is not vouched for
    (directory / "defense.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="lists no reference sample"):
        load_defense(directory, SECRET)
