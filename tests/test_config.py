"""Config errors name the file, the line and the key; the embedded default; secret references."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from conftest import (
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    store_state,
    vault_made,
    write_vault_config,
)

import strongroom
from strongroom import AuthenticationFailed, ConfigError
from strongroom import config as config_mod
from strongroom.cli import exit_code_of


def write(tmp_path: Path, *lines: str) -> Path:
    """A config file made of `lines` (line 1 is lines[0])."""
    path = tmp_path / "strongroom.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def data_dir(tmp_path: Path) -> str:
    return f'data_dir = "{tmp_path / "data"}"'


def vault_table(*extra: str) -> list[str]:
    return [
        "[backends.vault]",
        'type = "vault"',
        f'passphrase = "env:{VAULT_PASS_ENV}"',
        "kdf_memory_kib = 8192",
        "kdf_iterations = 1",
        *extra,
    ]


def config_error(path: Path, *, via_open: bool = False) -> ConfigError:
    """Load (or open a keystore on) `path` and return the ConfigError it raises."""
    with pytest.raises(ConfigError) as info:
        if via_open:
            strongroom.open(path).close()
        else:
            config_mod.load(path)
    return info.value


def assert_names(e: ConfigError, path: Path, line: int | None, key: str) -> None:
    assert e.path == str(path)
    assert e.line == line, f"line {e.line}, expected {line}: {e}"
    assert e.key == key
    where = f"{path}:{line}" if line is not None else str(path)
    assert str(e).startswith(f"{where}: {key}: "), str(e)
    assert exit_code_of(type(e)) == 11


# -- unknown names --------------------------------------------------------------------------------
def test_unknown_top_level_table(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[keystore]", data_dir(tmp_path), "", "[backend.vault]", 'type = "vault"'
    )
    e = config_error(path)
    assert_names(e, path, 4, "backend")
    assert "unknown table" in str(e)


def test_unknown_top_level_plain_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[keystore]", data_dir(tmp_path), "", "[logging]", "level = 1")
    assert_names(config_error(path), path, 4, "logging")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "# my config", 'colour = "blue"', "[keystore]", data_dir(tmp_path))
    e = config_error(path)
    assert_names(e, path, 2, "colour")
    assert "unknown key" in str(e)


def test_unknown_key_in_keystore(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[keystore]",
        data_dir(tmp_path),
        "# ordr = typo in a comment is not the key",
        'ordr = ["vault"]',
        "",
        *vault_table(),
    )
    e = config_error(path)
    assert_names(e, path, 4, "keystore.ordr")
    assert "order" in str(e)  # it lists the keys it knows


def test_unknown_key_in_the_vault_table(tmp_path: Path) -> None:
    # data_dir is a good key in [keystore] (line 2) and an unknown one in [backends.vault]
    path = write(
        tmp_path,
        "[keystore]",
        data_dir(tmp_path),
        'namespace = "default"',
        "",
        *vault_table(
            "",
            "# comment",
            'data_dir = "/elsewhere"',
        ),
    )
    e = config_error(path, via_open=True)
    assert_names(e, path, 12, "backends.vault.data_dir")
    assert "kdf_memory_kib" in str(e)  # the known keys are listed


def test_a_table_declared_twice_is_a_toml_error_naming_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        *vault_table(),
        "",
        "[keystore]",
        data_dir(tmp_path),
        "",
        "[backends.vault]",  # a second header for the same table is a TOML error
    )
    e = config_error(path)
    assert e.line == 10
    assert "not valid TOML" in str(e)


# -- wrong types and values ------------------------------------------------------------------------
KS = ["", "[keystore]", "{data_dir}"]  # appended after the line under test


@pytest.mark.parametrize(
    ("lines", "line", "key", "via_open"),
    [
        (["[keystore]", 'order = "vault"'], 2, "keystore.order", False),
        (["[keystore]", "order = [1]"], 2, "keystore.order", False),
        (["[keystore]", "", "data_dir = 5"], 3, "keystore.data_dir", False),
        (["[keystore]", 'audit = "loud"'], 2, "keystore.audit", False),
        (["[keystore]", 'namespace = "two words"'], 2, "keystore.namespace", False),
        (["keystore = 3"], 1, "keystore", False),
        (["[backends]", "vault = 3"], 2, "backends.vault", False),
        (["[backends.vault]", 'passphrase = "env:X"'], 1, "backends.vault.type", False),
        (["[backends.vault]", "type = 1"], 2, "backends.vault.type", False),
        ([*vault_table('create = "yes"'), *KS], 6, "backends.vault.create", True),
        ([*vault_table('unlock = "passphrase"'), *KS], 6, "backends.vault.unlock", True),
        ([*vault_table("path = 7"), *KS], 6, "backends.vault.path", True),
        (
            ["[backends.vault]", 'type = "vault"', "passphrase = 5", *KS],
            3,
            "backends.vault.passphrase",
            True,
        ),
        (
            ["[backends.vault]", 'type = "vault"', 'kdf_iterations = "1"', *KS],
            3,
            "backends.vault.kdf_iterations",
            True,
        ),
    ],
)
def test_wrong_type(tmp_path: Path, lines: list[str], line: int, key: str, via_open: bool) -> None:
    path = write(tmp_path, *(x.format(data_dir=data_dir(tmp_path)) for x in lines))
    assert_names(config_error(path, via_open=via_open), path, line, key)


def test_kdf_setting_below_the_minimum_names_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[keystore]",
        data_dir(tmp_path),
        "",
        "[backends.vault]",
        'type = "vault"',
        "kdf_memory_kib = 1024",
    )
    assert_names(config_error(path, via_open=True), path, 6, "backends.vault.kdf_memory_kib")


def test_a_boolean_is_not_an_integer(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[keystore]",
        data_dir(tmp_path),
        "",
        "[backends.vault]",
        'type = "vault"',
        "kdf_iterations = true",
    )
    assert_names(config_error(path, via_open=True), path, 6, "backends.vault.kdf_iterations")


@pytest.mark.parametrize(
    "value",
    ['"hunter2"', '["env:SR_TEST_NOT_SET", "hunter2"]', '"env:"', '"file:"', '"Prompt"'],
)
def test_a_literal_secret_is_refused(tmp_path: Path, value: str) -> None:
    path = write(
        tmp_path,
        "[keystore]",
        data_dir(tmp_path),
        "",
        "[backends.vault]",
        'type = "vault"',
        f"passphrase = {value}",
    )
    e = config_error(path, via_open=True)
    assert_names(e, path, 6, "backends.vault.passphrase")
    assert "env:NAME, file:PATH or prompt" in str(e)
    assert "hunter2" not in str(e)
    assert not vault_made(path.parent / "data")


def test_order_names_a_missing_backend(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[keystore]", data_dir(tmp_path), 'order = ["tpm", "vault"]', "", *vault_table()
    )
    e = config_error(path)
    assert_names(e, path, 3, "keystore.order")
    assert "'tpm'" in str(e) and "[backends.tpm]" in str(e)


def test_order_spanning_lines_names_its_first_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[keystore]", "order = [", '  "vault",', '  "nosuch",', "]")
    assert_names(config_error(path), path, 2, "keystore.order")


def test_vault_not_last_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[keystore]",
        'order = ["vault", "hsm"]',
        data_dir(tmp_path),
        "",
        "[backends.hsm]",
        'type = "pkcs11"',
        "",
        *vault_table(),
    )
    e = config_error(path)
    assert_names(e, path, 2, "keystore.order")
    assert "last" in str(e)


def test_order_names_a_backend_twice(tmp_path: Path) -> None:
    path = write(tmp_path, "[keystore]", 'order = ["vault", "vault"]')
    assert_names(config_error(path), path, 2, "keystore.order")


def test_two_vaults(tmp_path: Path) -> None:
    path = write(tmp_path, *vault_table(), "", "[backends.vault2]", 'type = "vault"')
    assert_names(config_error(path), path, 7, "backends.vault2")


def test_unknown_backend_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[keystore]",
        data_dir(tmp_path),
        "",
        "[backends.hsm]",
        "# the type is misspelt",
        'type = "pkcs-11"',
        "",
        *vault_table(),
    )
    e = config_error(path, via_open=True)
    assert_names(e, path, 6, "backends.hsm.type")
    assert "'pkcs-11'" in str(e) and "vault" in str(e)


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[keystore]", data_dir(tmp_path), "order = [vault]")
    e = config_error(path)
    assert e.line == 3 and e.path == str(path)
    assert "not valid TOML" in str(e)


def test_missing_config_file_is_an_error_not_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("STRONGROOM_CONFIG", str(missing))
    e = config_error(None)  # type: ignore[arg-type]
    assert e.path == str(missing) and "not found" in str(e)


# -- the embedded default and the user config dir --------------------------------------------
@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("STRONGROOM_CONFIG", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    return tmp_path


def test_embedded_default_without_any_config(isolated_home: Path) -> None:
    assert config_mod.default_path() == isolated_home / "xdg-config/strongroom/strongroom.toml"
    cfg = config_mod.load()
    assert cfg.path is None
    assert cfg.order == ["vault"]
    assert list(cfg.backends) == ["vault"]
    assert cfg.backends["vault"].type == "vault"
    assert cfg.data_dir == isolated_home / "xdg-data/strongroom"
    assert cfg.namespace == "default"
    passphrase = cfg.backends["vault"].settings["passphrase"]
    assert all(ref.startswith("env:") or ref == "prompt" for ref in passphrase)
    with strongroom.open() as ks:
        (status,) = ks.backends()
        assert (status.name, status.type, status.available) == ("vault", "vault", True)
        assert ks.vault.path == isolated_home / "xdg-data/strongroom/vault.snapshot"  # type: ignore[attr-defined]
        assert ks.keys() == []
    # nothing was written outside the temp dirs, and no vault was made just by opening
    assert not vault_made(isolated_home / "xdg-data/strongroom")
    assert not (isolated_home / "xdg-config").exists()


def test_config_in_the_user_config_dir_is_used(isolated_home: Path) -> None:
    user_cfg = config_mod.default_path()
    user_cfg.parent.mkdir(parents=True)
    written = write_vault_config(isolated_home, name="tmp.toml")
    written.rename(user_cfg)
    cfg = config_mod.load()
    assert cfg.path == str(user_cfg)
    assert cfg.data_dir == isolated_home / "data"


def test_strongroom_config_env_wins(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_cfg = config_mod.default_path()
    user_cfg.parent.mkdir(parents=True)
    user_cfg.write_text("[keystore]\nbogus = 1\n", encoding="utf-8")
    other = write_vault_config(isolated_home / "home")
    monkeypatch.setenv("STRONGROOM_CONFIG", str(other))
    assert config_mod.load().path == str(other)


# -- secret references ---------------------------------------------------------------------
def secret_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "vault.pass"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def test_env_reference(vault_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with strongroom.open(vault_config) as ks:
        ks.generate("k", "ed25519")
    monkeypatch.setenv(VAULT_PASS_ENV, "something else")
    with pytest.raises(AuthenticationFailed), strongroom.open(vault_config) as ks:
        ks.sign("k", b"x")
    monkeypatch.delenv(VAULT_PASS_ENV)
    with pytest.raises(AuthenticationFailed) as info, strongroom.open(vault_config) as ks:
        ks.sign("k", b"x")
    assert f"env:{VAULT_PASS_ENV}" in str(info.value)


def test_file_reference_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = secret_file(tmp_path, VAULT_PASSPHRASE + "\n")
    by_file = write_vault_config(tmp_path, passphrase_ref=f"file:{secret}", name="file.toml")
    with strongroom.open(by_file) as ks:
        ks.generate("k", "ed25519")  # creates the vault with the file's passphrase
    # the same vault opens with the passphrase from the environment: the newline was stripped
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    with strongroom.open(write_vault_config(tmp_path, name="env.toml")) as ks:
        ks.sign("k", b"x")
    # a list is tried in order: an unset env var falls through to the file
    text = by_file.read_text().replace(
        f'passphrase = "file:{secret}"', f'passphrase = ["env:SR_TEST_UNSET", "file:{secret}"]'
    )
    by_file.write_text(text)
    monkeypatch.delenv("SR_TEST_UNSET", raising=False)
    with strongroom.open(by_file) as ks:
        ks.sign("k", b"x")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_group_or_world_readable_secret_file_is_refused(tmp_path: Path, mode: int) -> None:
    secret = secret_file(tmp_path, VAULT_PASSPHRASE)
    cfg = write_vault_config(tmp_path, passphrase_ref=f"file:{secret}")
    with strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
    before = store_state(cfg)
    secret.chmod(mode)
    with pytest.raises(ConfigError) as info, strongroom.open(cfg) as ks:
        ks.sign("k", b"x")
    e = info.value
    assert e.path == str(secret)
    assert "chmod 600" in str(e)
    assert VAULT_PASSPHRASE not in str(e)
    assert store_state(cfg) == before


def test_prompt_reference_uses_the_prompter(tmp_path: Path) -> None:
    cfg = write_vault_config(tmp_path, passphrase_ref="prompt")
    asked: list[tuple[str, bool]] = []

    def prompter(prompt: str, confirm: bool) -> str:
        asked.append((prompt, confirm))
        return VAULT_PASSPHRASE

    with strongroom.open(cfg, prompter=prompter) as ks:
        ks.generate("k", "ed25519")
    assert asked == [("Vault passphrase: ", True)]  # a new passphrase is asked for twice
    with strongroom.open(cfg, prompter=prompter) as ks:
        ks.sign("k", b"x")
    assert asked[-1] == ("Vault passphrase: ", False)


def test_prompt_without_a_terminal_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_vault_config(tmp_path, passphrase_ref="prompt")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    monkeypatch.setattr("strongroom.secrets.TTY", str(tmp_path / "no-tty"))  # prompts use /dev/tty
    with pytest.raises(AuthenticationFailed) as info, strongroom.open(cfg) as ks:
        ks.generate("k", "ed25519")
    assert "no terminal" in str(info.value)
    assert not vault_made(cfg.parent / "data")


def test_secret_source_directly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from strongroom.secrets import SecretSource, validate_reference

    for good in ("env:A", "file:/x", "file:~/x", "prompt"):
        validate_reference(good)
    for bad in ("hunter2", "env:", "file:", "ENV:A", "", "secret:A"):
        with pytest.raises(ValueError):
            validate_reference(bad)
    monkeypatch.setenv("SR_TEST_A", "value-a")
    assert SecretSource(["env:SR_TEST_A"], "p: ").get() == "value-a"
    assert SecretSource(["env:SR_TEST_A"], "p: ").available()
    monkeypatch.delenv("SR_TEST_A")
    assert not SecretSource(["env:SR_TEST_A"], "p: ").available()
    f = secret_file(tmp_path, "from-file\r\n")
    assert SecretSource([f"file:{f}"], "p: ").get() == "from-file"
    assert os.stat(f).st_mode & 0o777 == 0o600


# -- [ssh_agent] ----------------------------------------------------------------------------------
def test_ssh_agent_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[ssh_agent]",
        'keys = ["ssh-*", "git"]',
        'confirm = ["ssh-hsm"]',
        "allow_add = true",
        'add_backend = "vault"',
        'socket = "~/agent.sock"',
        'known_hosts = ["~/hosts", "/etc/ssh/ssh_known_hosts"]',
        *vault_table(),
    )
    agent = config_mod.load(path).ssh_agent
    assert agent.known_hosts == ["~/hosts", "/etc/ssh/ssh_known_hosts"]
    assert agent.keys == ["ssh-*", "git"]
    assert agent.confirm == ["ssh-hsm"]
    assert agent.allow_add is True
    assert agent.add_backend == "vault"
    assert agent.socket == Path("~/agent.sock").expanduser()
    default = config_mod.load(write(tmp_path, *vault_table())).ssh_agent
    assert default.keys == [] and default.known_hosts is None


HOST_FP = "SHA256:" + "A" * 43
HOST_KEY_B64 = "AAAAC3NzaC1lZDI1NTE5AAAAIBMMsy7XVIQ4t+tUdRQ0/U73tI2NY54zQ6MPxSEVqnb9"
"""An Ed25519 public key's blob, as in a .pub file or known_hosts."""


def test_ssh_agent_policy_tables(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        *vault_table(),
        '[ssh_agent.policy."ssh-prod-*"]',
        "confirm = true",
        f'allowed_hosts = ["{HOST_FP}", "ssh-ed25519 {HOST_KEY_B64} host comment", '
        '"bastion.example.com", "[10.0.0.5]:2222", "::1"]',
        "allowed_uids = [1000, 1001]",
        '[ssh_agent.policy."git"]',
        "allowed_uids = []",
    )
    policies = config_mod.load(path).ssh_agent.policies
    assert policies == [
        config_mod.SshAgentPolicy(
            "ssh-prod-*",
            confirm=True,
            allowed_hosts=(
                HOST_FP,
                f"ssh-ed25519 {HOST_KEY_B64} host comment",
                "bastion.example.com",
                "[10.0.0.5]:2222",
                "::1",
            ),
            allowed_uids=(1000, 1001),
        ),
        config_mod.SshAgentPolicy("git", allowed_uids=()),
    ]


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("confirm = 1", "confirm", "must be true or false"),
        ('allowed_hosts = ["user@github.com"]', "allowed_hosts", "must be a list of hosts"),
        ('allowed_hosts = ["[github.com]"]', "allowed_hosts", "must be a list of hosts"),
        ('allowed_hosts = ["SHA256:short"]', "allowed_hosts", "must be a list of hosts"),
        # a key line whose blob names another key type
        (f'allowed_hosts = ["ssh-rsa {HOST_KEY_B64}"]', "allowed_hosts", "list of hosts"),
        ('allowed_uids = ["root"]', "allowed_uids", "must be a list of user ids"),
        ("allowed_uids = [-1]", "allowed_uids", "must be a list of user ids"),
        ("allowed_users = []", "allowed_users", "unknown key"),
    ],
)
def test_ssh_agent_policy_errors_name_the_line(
    tmp_path: Path, line: str, key: str, message: str
) -> None:
    path = write(tmp_path, *vault_table(), '[ssh_agent.policy."ssh-*"]', line)
    e = config_error(path)
    assert e.key == f"ssh_agent.policy.ssh-*.{key}"
    assert e.line == len(vault_table()) + 2, str(e)
    assert message in str(e)


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ('keys = "ssh-*"', "keys", "must be a list of key name patterns"),
        ('confirm = [""]', "confirm", "must be a list of key name patterns"),
        ('allow_add = "yes"', "allow_add", "must be true or false"),
        ('add_backend = "hsm"', "add_backend", "has no [backends.hsm] table"),
        ("socket = 1", "socket", "must be a path"),
        ('known_hosts = "~/.ssh/known_hosts"', "known_hosts", "must be a list of paths"),
        ("keyz = []", "keyz", "unknown key"),
    ],
)
def test_ssh_agent_errors_name_the_line(tmp_path: Path, line: str, key: str, message: str) -> None:
    path = write(tmp_path, "[ssh_agent]", line, *vault_table())
    e = config_error(path)
    assert_names(e, path, 2, f"ssh_agent.{key}")
    assert message in str(e)


# -- KMIP: [server] kmip_listen and [kmip] ------------------------------------------------------
def test_kmip_is_served_only_with_mutual_tls(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[keystore]",
        data_dir(tmp_path),
        "[server]",
        'kmip_listen = "127.0.0.1:5696"',
        f'tls_cert = "{tmp_path / "c.pem"}"',
        f'tls_key = "{tmp_path / "k.pem"}"',
        "",
        *vault_table(),
    )
    e = config_error(path)
    assert_names(e, path, 4, "server.kmip_listen")
    assert "tls_client_ca" in str(e)


def test_kmip_table_is_checked(tmp_path: Path) -> None:
    base = ["[keystore]", data_dir(tmp_path), *vault_table(), "[kmip]"]
    e = config_error(write(tmp_path, *base, 'backend = "hsm"'))
    assert e.key == "kmip.backend" and "[backends.hsm]" in str(e)
    e = config_error(write(tmp_path, *base, "idle_timeout = 0"))
    assert e.key == "kmip.idle_timeout"
    e = config_error(write(tmp_path, *base, "max_connections = true"))
    assert e.key == "kmip.max_connections"
    e = config_error(write(tmp_path, *base, "port = 5696"))
    assert e.key == "kmip.port" and "unknown key" in str(e)
    ok = config_mod.load(
        write(tmp_path, *base, 'backend = "vault"', "max_connections = 8", "idle_timeout = 2.5")
    )
    assert (ok.kmip.backend, ok.kmip.max_connections, ok.kmip.idle_timeout) == ("vault", 8, 2.5)


# -- [store] (docs/cluster.md) ------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://strongroom@db.example:5432/keys",
        "postgres:///keys?host=/run/postgresql",
        "host=db.example dbname=keys user=strongroom sslmode=verify-full",
    ],
)
def test_a_store_url_is_taken(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, "[keystore]", data_dir(tmp_path), "", "[store]", f'url = "{url}"')
    assert config_mod.load(path).store_url == url


def test_without_a_store_table_the_store_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    path = write(tmp_path, "[keystore]", data_dir(tmp_path))
    assert config_mod.load(path).store_url is None


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://strongroom:hunter2secret@db.example/keys",
        "postgresql://strongroom@db.example/keys?sslmode=require&password=hunter2secret",
        "host=db.example dbname=keys password=hunter2secret",
    ],
)
def test_a_store_url_with_a_password_is_refused_without_showing_it(
    tmp_path: Path, url: str
) -> None:
    path = write(tmp_path, "[keystore]", data_dir(tmp_path), "", "[store]", f'url = "{url}"')
    e = config_error(path)
    assert_names(e, path, 5, "store.url")
    assert "pgpass" in str(e) and "hunter2secret" not in str(e)


@pytest.mark.parametrize(
    ("lines", "line", "key", "message"),
    [
        (['url = "mysql://db.example/keys"'], 5, "store.url", "PostgreSQL URL"),
        (['url = "keys.sqlite"'], 5, "store.url", "PostgreSQL URL"),
        (["url = 5"], 5, "store.url", "PostgreSQL URL"),
        (['path = "/var/lib/x"'], 5, "store.path", "unknown key"),
    ],
)
def test_a_bad_store_table_names_its_line(
    tmp_path: Path, lines: list[str], line: int, key: str, message: str
) -> None:
    path = write(tmp_path, "[keystore]", data_dir(tmp_path), "", "[store]", *lines)
    e = config_error(path)
    assert_names(e, path, line, key)
    assert message in str(e)


def test_a_tpm_rollback_counter_cannot_guard_a_shared_store(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[keystore]",
        data_dir(tmp_path),
        "[store]",
        'url = "postgresql:///keys"',
        *vault_table('rollback_counter = "tpm"'),
    )
    e = config_error(path)
    assert_names(e, path, 10, "backends.vault.rollback_counter")
    assert "one machine" in str(e)


def test_pkcs11_server_backend_is_checked(tmp_path: Path) -> None:
    base = ["[keystore]", data_dir(tmp_path), *vault_table(), "[pkcs11_server]", 'keys = ["a-*"]']
    e = config_error(write(tmp_path, *base, 'backend = "hsm"'))
    assert e.key == "pkcs11_server.backend" and "[backends.hsm]" in str(e)
    e = config_error(write(tmp_path, *base, "backend = 1"))
    assert e.key == "pkcs11_server.backend"
    ok = config_mod.load(write(tmp_path, *base, 'backend = "vault"'))
    assert ok.pkcs11_server.backend == "vault"
    assert config_mod.load(write(tmp_path, *base)).pkcs11_server.backend is None


def test_pkcs11_server_allow_destroy_is_a_boolean_off_by_default(tmp_path: Path) -> None:
    base = ["[keystore]", data_dir(tmp_path), *vault_table(), "[pkcs11_server]", 'keys = ["a-*"]']
    assert config_mod.load(write(tmp_path, *base)).pkcs11_server.allow_destroy is False
    ok = config_mod.load(write(tmp_path, *base, "allow_destroy = true"))
    assert ok.pkcs11_server.allow_destroy is True
    e = config_error(write(tmp_path, *base, 'allow_destroy = "yes"'))
    assert e.key == "pkcs11_server.allow_destroy" and "true or false" in str(e)
