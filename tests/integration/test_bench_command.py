"""`purifier bench` against real endpoints: two embedded sidecars on loopback (no timing asserted)."""

from __future__ import annotations

import json

import pytest
from model_servers import free_port

from purifier.cli import main
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration


def settings(target, **extra):
    return Settings.resolve({"model": str(target.directory), "defense": "none", "host": "127.0.0.1", "port": 0, "http_port": 0,
                             "metrics_port": -1, **extra}, env={})


@pytest.fixture(scope="module")
def pair(digits_target, flatten_cls):
    """An identity sidecar ("direct") and a flattening one ("sidecar") for the same model."""
    with BackgroundSidecar(settings(digits_target)) as a, \
            BackgroundSidecar(settings(digits_target), defense=flatten_cls()) as b:
        yield a, b


def test_bench_writes_every_cell_and_the_added_latency(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "bench.json"
    code = main(["bench", "--direct", f"127.0.0.1:{a.port}", "--sidecar", f"127.0.0.1:{b.port}",
                 "--model-name", a.model_name, "--concurrency", "1", "3", "--rows", "1", "5",
                 "--seconds", "0.4", "--rounds", "2", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["output"] == "probabilities"
    cells = {(c["endpoint"], c["concurrency"], c["rows"]): c for c in doc["cells"]}
    assert set(cells) == {(e, c, r) for e in ("direct", "sidecar") for c in (1, 3) for r in (1, 5)}
    for cell in cells.values():
        assert cell["calls"] > 0
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
        assert cell["throughput_rps"] > 0
        assert cell["rows_per_s"] == pytest.approx(cell["throughput_rps"] * cell["rows"])
    assert len(doc["comparisons"]) == 4
    for comp in doc["comparisons"]:
        d, s = cells["direct", comp["concurrency"], comp["rows"]], cells["sidecar", comp["concurrency"], comp["rows"]]
        assert comp["added_p50_ms"] == pytest.approx(s["p50_ms"] - d["p50_ms"])
        assert comp["throughput_ratio"] == pytest.approx(s["throughput_rps"] / d["throughput_rps"])
    assert len(doc["machine"]["load_average"]) == 3 and len(doc["load_average"]["end"]) == 3
    assert doc["inputs"]["sidecar"] == {"name": "input", "datatype": "FP32", "n_features": 64}
    table = capsys.readouterr().out
    assert "added p50" in table and table.count("sidecar") >= 8


def test_bench_sends_typed_contents_and_one_endpoint_alone(pair, capsys):
    a, _ = pair
    code = main(["bench", "--sidecar", f"127.0.0.1:{a.port}", "--model-name", a.model_name, "--concurrency", "2",
                 "--seconds", "0.2", "--rounds", "1", "--typed", "--output-name", "probabilities"])
    assert code == 0
    assert "added p50" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--output-name", "nope"], "has no output 'nope'"),
    (["--model-name", "other"], "ModelMetadata for 'other' failed: NOT_FOUND"),
])
def test_bench_mistakes_are_one_line_errors(pair, capsys, extra, message):
    a, _ = pair
    args = ["bench", "--sidecar", f"127.0.0.1:{a.port}", "--model-name", a.model_name, "--seconds", "0.1",
            "--rounds", "1", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("purifier: error:")


def test_bench_unreachable_endpoint_and_missing_json_directory(tmp_path, capsys):
    assert main(["bench", "--sidecar", f"127.0.0.1:{free_port()}", "--model-name", "m", "--timeout", "2"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert main(["bench", "--sidecar", "127.0.0.1:1", "--model-name", "m", "--json",
                 str(tmp_path / "no" / "x.json")]) == 2
    assert "--json: directory" in capsys.readouterr().err


def test_bench_over_mutual_tls_with_a_token(digits_target, pki, capsys):
    s = settings(digits_target, tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"),
                 tls_client_ca_file=str(pki / "ca.pem"), auth_token_file=str(pki / "token"))
    with BackgroundSidecar(s) as sc:
        base = ["bench", "--sidecar", f"127.0.0.1:{sc.port}", "--model-name", sc.model_name, "--seconds", "0.2",
                "--rounds", "1", "--concurrency", "1", "--tls-ca", str(pki / "ca.pem"),
                "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
        assert main(base) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main([*base, "--token-file", str(pki / "token")]) == 0
        assert (pki / "token").read_text().strip() not in capsys.readouterr().out


def test_bench_sends_real_records_and_refuses_the_wrong_width(pair, digits_target, tmp_path, capsys):
    from purifier.data.records import save_records

    a, _ = pair
    X, y = digits_target.role("eval_nonmembers")
    good, bad = save_records(tmp_path / "rows.npz", X[:40], y[:40]), save_records(tmp_path / "narrow.csv", X[:5, :10], y[:5])
    out = tmp_path / "bench.json"
    base = ["bench", "--sidecar", f"127.0.0.1:{a.port}", "--model-name", a.model_name, "--concurrency", "1",
            "--seconds", "0.2", "--rounds", "1"]
    assert main([*base, "--records", str(good), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["data"] == f"records from {good}"
    assert main([*base, "--records", str(bad)]) == 2
    assert "takes 64 features, the rows have 10" in capsys.readouterr().err
