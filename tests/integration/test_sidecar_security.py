"""TLS, mutual TLS and bearer tokens on the sidecar's listener (certificates made in the test)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from purifier.errors import ConfigError
from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.integration


def settings(target, **extra):
    return Settings.resolve({"model": str(target.directory), "defense": "none", "host": "127.0.0.1", "port": 0, "http_port": 0,
                             "metrics_port": -1, **extra}, env={})


def infer(port, name, **client_kw):
    headers = client_kw.pop("headers", None)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}", **client_kw)
    try:
        inp = grpcclient.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
        return client.infer(name, [inp], headers=headers, client_timeout=10).as_numpy("probabilities")
    finally:
        client.close()


def test_mutual_tls_requires_a_client_certificate(digits_target, pki):
    s = settings(digits_target, tls_cert_file=str(pki / "server.pem"), tls_key_file=str(pki / "server.key"),
                 tls_client_ca_file=str(pki / "ca.pem"))
    with BackgroundSidecar(s) as sc:
        tls = {"ssl": True, "root_certificates": str(pki / "ca.pem")}
        probs = infer(sc.port, sc.model_name, **tls, private_key=str(pki / "client.key"),
                      certificate_chain=str(pki / "client.pem"))
        assert probs.shape == (1, 10)
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            infer(sc.port, sc.model_name, **tls)  # no client certificate
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            infer(sc.port, sc.model_name)          # plaintext


def test_bearer_token_is_required_except_for_health(digits_target, pki):
    with BackgroundSidecar(settings(digits_target, auth_token_file=str(pki / "token"))) as sc:
        token = (pki / "token").read_text().strip()
        for scheme in ("Bearer", "bearer", "BEARER"):                 # RFC 7235: the scheme is case-insensitive
            assert infer(sc.port, sc.model_name, headers={"authorization": f"{scheme} {token}"}).shape == (1, 10)
        for headers in (None, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": token},
                        {"authorization": f"Basic {token}"}, {"authorization": f"Bearer{token}"}):
            with pytest.raises(InferenceServerException) as info:
                infer(sc.port, sc.model_name, headers=headers)
            assert "UNAUTHENTICATED" in str(info.value.status())
        with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_bad_access_settings_fail_at_start_up(digits_target, pki, tmp_path):
    with pytest.raises(ConfigError, match="tls_cert_file/tls_key_file"):
        settings(digits_target, tls_cert_file=str(pki / "server.pem"))
    with pytest.raises(ConfigError, match="tls_client_ca_file: mutual TLS needs"):
        settings(digits_target, tls_client_ca_file=str(pki / "ca.pem"))
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="auth_token_file: the token must be at least 16 bytes"):
        with BackgroundSidecar(settings(digits_target, auth_token_file=str(short))):
            pass
