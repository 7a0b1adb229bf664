"""Fitting and auditing a deployment as configured: mutual TLS and a bearer token on the endpoint,
and one clear line for each way of getting it wrong."""

from __future__ import annotations

import re

import pytest
from strong_secret import SECRET, write_secret

from purifier.audit.results import Report
from purifier.cli import main
from purifier.data.records import save_records
from purifier.defenses import load_defense

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def locked(digits_target, pki):
    """The sidecar serving the digits target with mutual TLS and a bearer token."""
    from purifier_server.app import BackgroundSidecar
    from purifier_server.settings import Settings

    s = Settings.resolve({"model": str(digits_target.directory), "defense": "none", "host": "127.0.0.1", "port": 0, "http_port": 0,
                          "metrics_port": -1, "tls_cert_file": str(pki / "server.pem"),
                          "tls_key_file": str(pki / "server.key"), "tls_client_ca_file": str(pki / "ca.pem"),
                          "auth_token_file": str(pki / "token")}, env={})
    with BackgroundSidecar(s) as sc:
        yield f"127.0.0.1:{sc.port}", sc.model_name


def _credentials(pki) -> list[str]:
    return ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"), "--tls-key",
            str(pki / "client.key"), "--token-file", str(pki / "token")]


def test_fit_and_audit_through_mutual_tls_with_a_token(locked, digits_target, pki, tmp_path):
    endpoint, name = locked
    save_records(tmp_path / "members.npz", *digits_target.role("train"))
    save_records(tmp_path / "reference.npz", *digits_target.role("reference"))
    write_secret(tmp_path / "secret")
    assert main(["fit-defense", "memguard", "--endpoint", endpoint, "--model-name", name, *_credentials(pki),
                 "--members", str(tmp_path / "members.npz"), "--reference", str(tmp_path / "reference.npz"),
                 "--secret-file", str(tmp_path / "secret"), "--param", "epochs=5", "--out", str(tmp_path / "mg")]) == 0
    # fitted from the endpoint: no model hash to bind to, but the fingerprint holds the model's answers
    defense = load_defense(tmp_path / "mg", secret=SECRET)
    assert defense.model_id == ""
    assert defense.fingerprint.mismatch(digits_target.predict_proba(defense.fingerprint.inputs)) is None
    assert main(["audit", "--endpoint", endpoint, "--model-name", name, *_credentials(pki), "--target",
                 str(digits_target.directory), "--attacks", "gap", "confidence", "--shadows", "1",
                 "--shadow-epochs", "5", "--bootstrap", "5", "--quiet", "--out", str(tmp_path / "r")]) == 0
    assert Report.read(tmp_path / "r").n_nonmembers == 400


@pytest.mark.parametrize("case,message", [
    ("plaintext", "accepts connections but does not answer plaintext gRPC .* pass --tls-ca"),
    ("no-client-cert", "TLS with endpoint .* failed .* --tls-cert/--tls-key if it requires client certificates"),
    ("no-token", "requires a bearer token .*; pass --token-file FILE"),
    ("wrong-token", "rejected the token in .*wrong.*; check --token-file"),
    ("half-mtls", "mutual TLS needs both the client certificate and its key"),
    ("missing-ca", "--tls-ca: .*nope.pem does not exist"),
])
def test_access_mistakes_are_one_line(locked, digits_target, pki, tmp_path, capsys, case, message):
    endpoint, name = locked
    creds = _credentials(pki)
    if case == "plaintext":
        creds = creds[-2:]
    elif case == "no-client-cert":
        creds = creds[:2] + creds[-2:]
    elif case == "no-token":
        creds = creds[:-2]
    elif case == "wrong-token":
        (tmp_path / "wrong").write_text("not-the-token-0123456789")
        creds[-1] = str(tmp_path / "wrong")
    elif case == "half-mtls":
        creds = creds[:4]
    elif case == "missing-ca":
        creds[1] = str(tmp_path / "nope.pem")
    rc = main(["audit", "--endpoint", endpoint, "--model-name", name, *creds, "--target",
               str(digits_target.directory), "--attacks", "gap", "--quiet", "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()
