import pytest

from purifier.errors import ConfigError
from purifier_server.settings import Settings

REMOTE = {"upstream": "127.0.0.1:9000", "model_name": "m", "confidence_output": "predict_proba"}


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    config = tmp_path / "sidecar.toml"
    config.write_text('[serve]\nupstream = "127.0.0.1:9000"\nmodel_name = "from-file"\n'
                      'confidence_output = "p"\nport = 7000\nmax_wait_ms = 2.5\nallow_outputs = ["a"]\n')
    env = {"PURIFIER_PORT": "7001", "PURIFIER_REFLECTION": "yes", "PURIFIER_MAX_BATCH_ROWS": "64"}
    s = Settings.resolve({"port": 7002, "model_name": None}, env, config)
    assert s.port == 7002                      # flag beats env and file
    assert s.max_batch_rows == 64 and s.reflection is True   # env beats default
    assert s.model_name == "from-file" and s.max_wait_ms == 2.5 and s.allow_outputs == ("a",)  # None flag ignored
    assert s.metrics_host == "127.0.0.1" and s.grace_s == 5.0  # defaults
    assert Settings.resolve({}, {**env, "PURIFIER_CONFIG": str(config)}).port == 7001


@pytest.mark.parametrize("change,field", [
    ({"defense": "magic"}, "defense: 'magic' is not one of none, memguard, purifier"),
    ({"defense": "memguard"}, "defense_dir: required"),
    ({"port": 70000}, "port:"),
    ({"metrics_port": -2}, "metrics_port:"),
    ({"max_batch_rows": 0}, "max_batch_rows: must be >= 1"),
    ({"max_wait_ms": -1.0}, "max_wait_ms"),
    ({"confidence_kind": "scores"}, "confidence_kind: 'scores' is not one of probabilities, logits"),
    ({"upstream": "nohost"}, "upstream: 'nohost' is not HOST:PORT"),
    ({"model_name": None}, "model_name: required"),
    ({"upstream_service": "a/b"}, "upstream_service"),
])
def test_invalid_values_fail_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        Settings.resolve({**REMOTE, **change}, {})


def test_exactly_one_backend_and_model_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="model/upstream"):
        Settings.resolve({}, {})
    with pytest.raises(ConfigError, match="model/upstream"):
        Settings.resolve({**REMOTE, "model": str(tmp_path)}, {})
    with pytest.raises(ConfigError, match="model: .* does not exist"):
        Settings.resolve({"model": str(tmp_path / "missing.onnx")}, {})


def test_bad_env_and_file_values_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="reflection: PURIFIER_REFLECTION='maybe' is not a boolean"):
        Settings.resolve(REMOTE, {"PURIFIER_REFLECTION": "maybe"})
    with pytest.raises(ConfigError, match="port: 'abc' is not a valid int"):
        Settings.resolve(REMOTE, {"PURIFIER_PORT": "abc"})
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown key.*prot.*valid keys"):
        Settings.resolve(REMOTE, {}, bad)
    bad.write_text("port = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.resolve(REMOTE, {}, bad)


def test_settings_are_frozen():
    s = Settings.resolve(REMOTE, {})
    with pytest.raises(AttributeError):
        s.port = 1
