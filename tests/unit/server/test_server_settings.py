from dataclasses import fields

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
    ({"gather_ms": -0.5}, "gather_ms: must be >= 0"),
    ({"confidence_kind": "scores"}, "confidence_kind: 'scores' is not one of probabilities, logits"),
    ({"upstream": "nohost"}, "upstream: 'nohost' is not HOST:PORT"),
    ({"model_name": None}, "model_name: required"),
    ({"upstream_service": "a/b"}, "upstream_service"),
    ({"workers": "0"}, "workers: '0' is not a number of processes"),
    ({"workers": "two"}, "workers: 'two' is not a number of processes"),
    ({"workers": "2", "device": "cuda"}, "workers: several workers serve on the CPU only"),
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


def test_every_setting_has_a_generated_flag_with_help():
    import argparse
    from dataclasses import fields

    from purifier_server.settings import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    by_dest = {a.dest: a for a in parser._actions}
    for f in fields(Settings):
        assert f.name in by_dest, f"setting {f.name} has no flag"
        assert by_dest[f.name].help and by_dest[f.name].option_strings[0].startswith("--")
    parser.format_help()  # mutually exclusive groups and help strings render


def test_generated_flags_parse_into_settings():
    from purifier_server.settings import parse_arguments

    s = parse_arguments(["--upstream", "127.0.0.1:9000", "--model-name", "m", "--confidence-output", "p",
                         "--allow-output", "label", "--allow-output", "rank", "--logits", "--reflection",
                         "--grace", "2.5", "--max-request-rows", "8", "--max-queued-rows", "64",
                         "--allow-trailer", "x-req"], env={"PURIFIER_PORT": "7001"})
    assert (s.upstream, s.model_name, s.confidence_output) == ("127.0.0.1:9000", "m", "p")
    assert s.allow_outputs == ("label", "rank") and s.allow_trailers == ("x-req",) and s.allow_parameters == ()
    assert s.confidence_kind == "logits" and s.reflection is True and s.grace_s == 2.5
    assert s.max_request_rows == 8 and s.max_queued_rows == 64 and s.port == 7001   # env still applies
    with pytest.raises(SystemExit):
        parse_arguments(["--model", "a.onnx", "--upstream", "h:1"], env={})    # mutually exclusive


@pytest.mark.parametrize("change,message", [
    ({"allow_outputs": ("predict_proba",)}, "is the confidence output"),
    ({"allow_outputs": ("Logits",)}, "looks like a logits output"),
    ({"defense": "none", "defense_dir": "."}, "'none' contradicts defense_dir"),
    ({"max_queued_rows": 10, "max_request_rows": 20}, r"max_queued_rows: 10 is below 20 \(max_request_rows"),
    ({"max_queued_rows": 300, "max_request_rows": 300}, r"max_queued_rows: 300 is below 556 "),
    ({"max_request_bytes": -1}, "max_request_bytes: must be >= 0"),
    ({"allow_parameters": ("predict_proba",)}, "allow_parameters: 'predict_proba' is named like the confidence output"),
    ({"allow_parameters": ("x-Predict-Proba-top",)}, "allow_parameters: 'x-Predict-Proba-top' is named like"),
    ({"allow_trailers": ("x-predict_proba-bin",)}, "allow_trailers: 'x-predict_proba-bin' is named like"),
    ({"allow_trailers": ("x-logits",)}, "allow_trailers: 'x-logits' is named like the confidence output"),
    ({"allow_trailers": ("scores",)}, "a trailer is forwarded verbatim"),
])
def test_operator_mistakes_that_would_fail_open_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        Settings.resolve({**REMOTE, **change}, {})


def test_parameters_and_trailers_named_otherwise_are_forwarded_verbatim_as_documented():
    s = Settings.resolve({**REMOTE, "allow_parameters": ("model_version_hint",), "allow_trailers": ("x-req",)}, {})
    assert s.allow_parameters == ("model_version_hint",) and s.allow_trailers == ("x-req",)
    help_texts = {f.name: f.metadata["help"] for f in fields(Settings)}
    assert "VERBATIM" in help_texts["allow_parameters"] and "VERBATIM" in help_texts["allow_trailers"]


def test_defense_dir_alone_is_accepted_and_the_defense_left_to_defense_json(tmp_path):
    s = Settings.resolve({**REMOTE, "defense_dir": str(tmp_path)}, {})
    assert s.defense is None and s.defense_dir == str(tmp_path)


def test_top_level_keys_beside_a_serve_table_are_refused_not_dropped(tmp_path):
    """A config keeping its access settings at the top and the rest under [serve] would otherwise
    start a sidecar without its bearer token, listening on 0.0.0.0."""
    (tmp_path / "token").write_text("a-token-of-24-characters\n")
    config = tmp_path / "purifier.toml"
    config.write_text(f'auth_token_file = "{tmp_path / "token"}"\nhost = "127.0.0.1"\n\n[serve]\nport = 9001\n')
    with pytest.raises(ConfigError, match=r"auth_token_file, host beside the \[serve\] table .* move them into"):
        Settings.resolve({**REMOTE, "defense": "none"}, env={}, config=config)
    config.write_text(f'auth_token_file = "{tmp_path / "token"}"\nhost = "127.0.0.1"\nport = 9001\n')
    s = Settings.resolve({**REMOTE, "defense": "none"}, env={}, config=config)
    assert (s.auth_token_file, s.host, s.port) == (str(tmp_path / "token"), "127.0.0.1", 9001)


def test_an_unknown_purifier_variable_is_refused_naming_the_likely_one():
    """PURIFIER_AUTH_TOKEN (the token itself, misspelt) must not leave the sidecar without one."""
    with pytest.raises(ConfigError, match="PURIFIER_AUTH_TOKEN .did you mean PURIFIER_AUTH_TOKEN_FILE"):
        Settings.resolve({**REMOTE, "defense": "none"}, env={"PURIFIER_AUTH_TOKEN": "a-token-of-24-characters"})
    # the variables the project reads besides the settings are not refused
    Settings.resolve({**REMOTE, "defense": "none"}, env={"PURIFIER_SECRET": "x", "PURIFIER_SECRET_FILE": "y",
                                                          "PURIFIER_CACHE_DIR": "z", "PURIFIER_PORT": "7001"})
