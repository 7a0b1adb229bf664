"""Red-team: settings that vanish without a word, taking the bearer token and the loopback bind
with them.

`_read_config` reads either a `[serve]` table or top-level keys: when the file has a `[serve]`
table, every top-level key beside it is dropped silently (no "unknown key" error, no warning). A
config that keeps its access settings at the top and the rest under `[serve]` starts a sidecar
with no bearer token, listening on 0.0.0.0. Likewise a misspelt `PURIFIER_*` variable (the token
itself in PURIFIER_AUTH_TOKEN instead of a file in PURIFIER_AUTH_TOKEN_FILE) is ignored.
Expected: refused in one line naming the key, like an unknown key inside `[serve]`.
"""

import pytest

from purifier.errors import ConfigError
from purifier_server.settings import Settings

BASE = {"upstream": "127.0.0.1:9001", "model_name": "m", "confidence_output": "probs", "defense": "none"}


def test_top_level_keys_beside_a_serve_table_are_not_dropped(tmp_path):
    (tmp_path / "token").write_text("redteam-token-0123456789\n")
    config = tmp_path / "purifier.toml"
    config.write_text(f'auth_token_file = "{tmp_path / "token"}"\nhost = "127.0.0.1"\n\n[serve]\nport = 9001\n')
    try:
        settings = Settings.resolve(BASE, env={}, config=config)
    except ConfigError as e:
        assert "auth_token_file" in str(e)
        return
    assert settings.auth_token_file == str(tmp_path / "token") and settings.host == "127.0.0.1", (
        f"auth_token_file={settings.auth_token_file!r} host={settings.host!r}: the top-level keys were dropped")


def test_an_unknown_purifier_variable_is_not_ignored():
    with pytest.raises(ConfigError, match="PURIFIER_AUTH_TOKEN"):
        Settings.resolve(BASE, env={"PURIFIER_AUTH_TOKEN": "redteam-token-0123456789"})
