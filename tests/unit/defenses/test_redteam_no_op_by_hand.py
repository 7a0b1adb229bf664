"""Red-team: a no-op defense written into defense.json by hand (an attacker who can write the
defense directory, or an operator "just testing") is loaded and served.

Issue 21 (item 2): a defense that leaves 99% or more of the reference vectors unchanged is refused
at fit time *and again when serve loads the directory*. The rule (on branch safe-lib) applies the
defense to a reference sample kept in the directory, falling back to the fingerprint's rows, and
"with neither, nothing is checked". So the same edit that sets `scale` to 0 can drop the
`reference_sample` and `fingerprint` entries (and their files from `files`: no hash to
recompute at all), and the directory loads as a defense that changes nothing; the fingerprint is
only needed for the identity check, which --model-id replaces. Expected: refused on load whatever
the directory lacks (a no-op check that does not depend on files the attacker controls: e.g.
probability rows the library draws itself, or refuse a directory with no sample).
"""

import json

import numpy as np
import pytest
from strong_secret import strong_secret

from purifier.defenses import FitData, load_defense
from purifier.defenses.baselines import Noise
from purifier.errors import ConfigError


def fitted_noise(directory):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(400, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    inputs = rng.normal(size=(400, 8)).astype(np.float32)
    labels = probs.argmax(axis=1)
    data = FitData(probs[:200], probs[200:], inputs[:200], inputs[200:], labels[:200], labels[200:], "ab" * 32)
    Noise(scale=0.05, secret=strong_secret()).fit(data).save(directory)
    return probs[200:]


@pytest.mark.xfail(strict=True, reason="red-team break open; fixed on branch hardening")
def test_a_no_op_setting_written_by_hand_is_refused_even_without_sample_and_fingerprint(tmp_path):
    directory = tmp_path / "noise"
    reference = fitted_noise(directory)
    manifest_path = directory / "defense.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["scale"] = 0.0
    for key in ("reference_sample", "fingerprint"):
        entry = manifest.pop(key, None)
        if isinstance(entry, dict):
            manifest["files"].pop(entry.get("file", ""), None)
            (directory / entry.get("file", "")).unlink(missing_ok=True)
    manifest_path.write_text(json.dumps(manifest))
    try:
        defense = load_defense(directory, strong_secret())
    except ConfigError:
        return
    out = defense.transform(reference)
    pytest.fail(f"loaded: scale 0 leaves {int(np.isclose(out, reference, atol=2**-23).all(axis=1).sum())} of "
                f"{len(reference)} reference vectors unchanged")
