"""The Dockerfile and the Kubernetes example cannot run here (no Docker engine, no cluster), so
they are parsed and checked against the sidecar's real settings instead."""

import dataclasses
from pathlib import Path

import yaml

from purifier_server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[3]
SETTING_ENV = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_runs_the_sidecar_with_known_settings():
    ins = dockerfile_instructions()
    assert ins[0][0] == "FROM" and "python:3.11" in ins[0][1]
    assert ("ENTRYPOINT", '["purifier", "serve"]') in ins
    run = " ".join(v for k, v in ins if k == "RUN")
    assert "-c constraints.txt" in run and "'.[cpu]'" in run
    assert "full" not in run and "torch" not in run  # the slim serving image (pyproject's base install)
    copied = " ".join(v for k, v in ins if k == "COPY")
    for needed in ("pyproject.toml", "constraints.txt", "purifier", "server", "proto"):
        assert needed in copied
    env = dict(pair.split("=", 1) for k, v in ins if k == "ENV" for pair in v.split())
    purifier_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    assert set(purifier_env) <= SETTING_ENV, set(purifier_env) - SETTING_ENV
    exposed = {int(p) for k, v in ins if k == "EXPOSE" for p in v.split()}
    assert {int(purifier_env["PURIFIER_PORT"]), int(purifier_env["PURIFIER_HTTP_PORT"]),
            int(purifier_env["PURIFIER_METRICS_PORT"])} == exposed
    assert any(k == "USER" and not v.startswith("0") for k, v in ins), "the sidecar must not run as root"


def test_kubernetes_example_is_a_sidecar_pod_with_grpc_probes_and_scrape(tmp_path):
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/triton-with-purifier.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = deployment["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    assert set(containers) == {"triton", "purifier"}
    sidecar, triton = containers["purifier"], containers["triton"]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert set(env) <= SETTING_ENV, set(env) - SETTING_ENV
    # the sidecar's upstream is Triton's gRPC port on loopback, and Triton listens only there
    assert env["PURIFIER_UPSTREAM"] == "127.0.0.1:8001"
    assert "--grpc-address=127.0.0.1" in triton["args"] and "--allow-http=false" in triton["args"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert sidecar["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert "tcpSocket" in sidecar["livenessProbe"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc"]
    # the real settings parser accepts the manifest's environment (mounted paths made local)
    env = {**env, "PURIFIER_DEFENSE_DIR": str(tmp_path), "PURIFIER_SECRET_FILE": str(tmp_path / "s")}
    settings = Settings.resolve(env=env)
    assert (settings.upstream, settings.defense, settings.grace_s) == ("127.0.0.1:8001", "memguard", 20.0)


def test_kserve_example_admits_ingress_to_the_sidecar_only(tmp_path):
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/kserve-with-purifier.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "NetworkPolicy"}
    pod = kinds["Deployment"]["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    sidecar, kserve = containers["purifier"], containers["kserve"]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert set(env) <= SETTING_ENV, set(env) - SETTING_ENV
    kserve_grpc = int(kserve["args"][kserve["args"].index("--grpc-port") + 1])
    kserve_http = int(kserve["args"][kserve["args"].index("--http-port") + 1])
    assert env["PURIFIER_UPSTREAM"] == f"127.0.0.1:{kserve_grpc}" and "ports" not in kserve
    sidecar_ports = {p["containerPort"] for p in sidecar["ports"]}
    # the policy selects this pod, filters ingress, and every rule names only sidecar ports
    policy = kinds["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == pod["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    admitted = [p["port"] for rule in policy["ingress"] for p in rule["ports"]]
    assert all(rule.get("ports") for rule in policy["ingress"]), "a rule without ports admits every port"
    assert set(admitted) <= sidecar_ports and not {kserve_grpc, kserve_http} & set(admitted)
    assert [p["targetPort"] for p in kinds["Service"]["spec"]["ports"]] == ["grpc"]
    env = {**env, "PURIFIER_DEFENSE_DIR": str(tmp_path), "PURIFIER_SECRET_FILE": str(tmp_path / "s")}
    assert Settings.resolve(env=env).upstream == f"127.0.0.1:{kserve_grpc}"


def test_kserve_inferenceservice_puts_purifier_in_front_of_the_predictor(tmp_path):
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/kserve-inferenceservice.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"InferenceService", "NetworkPolicy"}
    isvc = kinds["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    first, *others = predictor["containers"]
    # KServe routes to the first container, kserve-container: it must be the sidecar, on its REST port
    assert first["name"] == "kserve-container" and first["image"].startswith("purifier-sidecar")
    env = {e["name"]: e["value"] for e in first["env"]}
    assert set(env) <= SETTING_ENV, set(env) - SETTING_ENV
    rest_port = int(env["PURIFIER_HTTP_PORT"])
    assert [p["containerPort"] for p in first["ports"]] == [rest_port]
    assert first["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": rest_port}
    assert first["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (model,) = others
    assert "ports" not in model  # the undefended server declares nothing
    model_grpc = int(model["args"][model["args"].index("--grpc-port") + 1])
    model_http = int(model["args"][model["args"].index("--http-port") + 1])
    # the real settings parser accepts the environment: a defense, the model server over loopback
    env = {**env, "PURIFIER_DEFENSE_DIR": str(tmp_path), "PURIFIER_SECRET_FILE": str(tmp_path / "s")}
    settings = Settings.resolve(env=env)
    assert settings.upstream == f"127.0.0.1:{model_grpc}" and settings.defense not in (None, "none")
    assert settings.http_port == rest_port and settings.http_port not in (model_grpc, model_http)
    assert {settings.port, settings.metrics_port}.isdisjoint({model_grpc, model_http})
    policy = kinds["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}
    admitted = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert all(rule.get("ports") for rule in policy["ingress"])
    assert admitted == {settings.http_port, settings.port, settings.metrics_port}
