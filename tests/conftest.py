"""Shared fixtures.

Vault fixtures (used by test_cli, test_snapshot, test_crash, test_config):

- `vault_config(tmp_path, monkeypatch)`: a config TOML for a software vault in
  tmp_path, with cheap Argon2id settings and the passphrase taken from
  `$SR_TEST_VAULT_PASS` (set by the fixture). `$STRONGROOM_CONFIG` points at it.
- `cli`: run the `strongroom` console script: in a child of the session's fork server
  (tests/cli_forkserver.py), which is the process the kernel would start without the
  0.3 s of interpreter start and imports; in a real subprocess for the commands that serve
  or detach, for a call that sets a variable read at startup (locale, PYTHON*,
  STRONGROOM_NO_SECRETMEM...), and with `real_process=True`.

Both are plain functions too (`write_vault_config`, `run_cli`), for module-scoped setups;
`run_strongroom` is `subprocess.run(capture_output=True)` of the console script with a
whole environment, through the fork server too. The terminal summary counts the calls run
each way. Tests that watch the process itself (signals, /proc, a terminal, limits set
before exec) start the console script with subprocess themselves (`STRONGROOM_BIN`).

The suite is hermetic: importing this file removes every `STRONGROOM_*` variable of the
developer's shell and points the user config and data dirs at a throwaway directory (see
`scrub_user_environment`; tests/test_environment.py proves it).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from cli_forkserver import ForkServer

VAULT_PASS_ENV = "SR_TEST_VAULT_PASS"
VAULT_PASSPHRASE = "correct horse battery staple 7f3a"
STRONGROOM_BIN = Path(sys.executable).parent / "strongroom"
PYCACHE = Path(tempfile.gettempdir()) / f"strongroom-tests-pycache-{os.getuid()}"

# -- a hermetic environment ---------------------------------------------------------------------
USER_ENV_PREFIX = "STRONGROOM_"
XDG_DIRS = ("XDG_CONFIG_HOME", "XDG_DATA_HOME")


def scrub_user_environment(environ: MutableMapping[str, str], home: Path) -> list[str]:
    """Remove every STRONGROOM_* variable from `environ`; point the XDG dirs under `home`.

    A developer's STRONGROOM_CONFIG, STRONGROOM_SERVER or STRONGROOM_TOKEN would otherwise
    send the CLI and the client to their own vault or service, and STRONGROOM_NO_SECRETMEM
    would change the memory backing under the tests. Without STRONGROOM_CONFIG the code falls
    back to the user config and data dirs (platformdirs: XDG_CONFIG_HOME, XDG_DATA_HOME), so
    those point into `home` too: no test reads or writes the developer's real keystore.
    Returns the names removed (names only: their values may be secrets).
    """
    removed = sorted(name for name in environ if name.startswith(USER_ENV_PREFIX))
    for name in removed:
        del environ[name]
    for name in XDG_DIRS:
        environ[name] = str(home / name.lower())
    return removed


# At import time: pytest imports this file before any test module, so before strongroom's
# native module reads STRONGROOM_NO_SECRETMEM and before any helper copies os.environ for a
# subprocess. Tests that need one of the variables set it themselves (monkeypatch or env=).
TEST_HOME = Path(tempfile.mkdtemp(prefix="strongroom-tests-home-"))
atexit.register(shutil.rmtree, TEST_HOME, ignore_errors=True)
SCRUBBED_NAMES = scrub_user_environment(os.environ, TEST_HOME)


def write_vault_config(
    directory: Path,
    *,
    passphrase_ref: str = f"env:{VAULT_PASS_ENV}",
    extra_vault: str = "",
    name: str = "strongroom.toml",
    store_url: str | None = None,
) -> Path:
    """Write a vault-only config (data_dir = directory/data) and return its path; with
    `store_url`, its store is that PostgreSQL database (docs/cluster.md)."""
    data_dir = directory / "data"
    path = directory / name
    store = f'[store]\nurl = "{store_url}"\n\n' if store_url else ""
    path.write_text(
        "[keystore]\n"
        f'data_dir = "{data_dir}"\n'
        "\n"
        f"{store}"
        "[backends.vault]\n"
        'type = "vault"\n'
        f'passphrase = "{passphrase_ref}"\n'
        "kdf_memory_kib = 8192\n"
        "kdf_iterations = 1\n"
        f"{extra_vault}",
        encoding="utf-8",
    )
    return path


CATALOG_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE keys (
    namespace TEXT NOT NULL, name TEXT NOT NULL, backend TEXT NOT NULL, handle TEXT NOT NULL,
    type TEXT NOT NULL, usage TEXT NOT NULL, exportable INTEGER NOT NULL,
    version INTEGER NOT NULL, created TEXT NOT NULL, attributes TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
INSERT INTO meta VALUES ('schema_version', '1');
"""
"""A catalog as schema 1 made it (one table of keys), for the migration tests: SQL both stores
take."""


def store_sql(config_path: Path, statement: str, *args: object) -> list[tuple[object, ...]]:
    """Run `statement` (`?` placeholders) on the store of a config, behind the keystore's
    back: the data dir's SQLite file, or the PostgreSQL database its `[store] url` names."""
    url = tomllib.loads(config_path.read_text()).get("store", {}).get("url")
    if url is not None:
        import psycopg

        with psycopg.connect(url, autocommit=True) as pg:
            cur = pg.execute(statement.replace("?", "%s"), args)  # type: ignore[arg-type]
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
    conn = sqlite3.connect(config_path.parent / "data" / "catalog.sqlite", isolation_level=None)
    try:
        return conn.execute(statement, args).fetchall()
    finally:
        conn.close()


def store_state(config_path: Path) -> str:
    """Everything in the data dir's store (catalog and vault rows) as one text, "" when there
    is none: what a refused command must leave exactly as it was."""
    path = config_path.parent / "data" / "catalog.sqlite"
    if not path.exists():
        return ""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "\n".join(db.iterdump())
    finally:
        db.close()


def vault_made(data_dir: Path) -> bool:
    """Whether the store in `data_dir` holds a vault (its header row)."""
    path = data_dir / "catalog.sqlite"
    if not path.exists():
        return False
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return "vault_headers" in tables and bool(
            db.execute("SELECT COUNT(*) FROM vault_headers").fetchone()[0]
        )
    finally:
        db.close()


def snapshot_path(config_path: Path) -> Path:
    """Where the vault of a `write_vault_config` config keeps its snapshot."""
    return config_path.parent / "data" / "vault.snapshot"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """The session's private PostgreSQL cluster (tests/emulators/pg_support.py), started on
    first use; `pg_cluster.new_database()` gives each test an empty database."""
    from pg_support import start_cluster

    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def vault_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cheap-KDF vault config in tmp_path; the passphrase env var and STRONGROOM_CONFIG set."""
    path = write_vault_config(tmp_path)
    monkeypatch.setenv(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    monkeypatch.setenv("STRONGROOM_CONFIG", str(path))
    return path


class CliResult(NamedTuple):
    returncode: int
    stdout: bytes
    stderr: str


DETACHING_COMMANDS = frozenset({"serve", "ssh-agent", "pkcs11-server"})
"""Commands that run a server or detach one: `run_cli` always gives them a real process."""


def _command_of(args: Sequence[str]) -> str | None:
    """The command word of `strongroom ARGS`: the first argument that is neither an option
    nor the value of a global option that takes one."""
    it = iter(args)
    for arg in it:
        if arg in ("--config", "--server"):
            next(it, None)
        elif not arg.startswith("-"):
            return arg
    return None


_fork_server: ForkServer | None = None
_fork_server_lock = threading.Lock()
FORK_SERVER_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
FORK_SERVER_ENV.setdefault("PYTHONPYCACHEPREFIX", str(PYCACHE))
"""The environment the fork server starts with: the scrubbed one of the suite, as run_cli
passes it (taken at import, so a test's monkeypatching does not leak into it)."""


CLI_CALLS: Counter[str] = Counter()
"""How run_strongroom ran the CLI this session, and why not in a fork: the terminal summary
shows it, so a variable that starts to differ from the server's shows up as a slow suite's
cause."""


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if CLI_CALLS:
        terminalreporter.write_sep("-", "strongroom CLI calls (run_cli, run_strongroom)")
        for how, count in sorted(CLI_CALLS.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{count:5d} {how}")


def fork_server() -> ForkServer:
    """The session's CLI fork server (tests/cli_forkserver.py), started on first use and
    stopped when pytest exits (it also exits by itself when pytest dies)."""
    global _fork_server
    with _fork_server_lock:
        if _fork_server is None:
            _fork_server = ForkServer(STRONGROOM_BIN, FORK_SERVER_ENV)
            atexit.register(_fork_server.close)
        return _fork_server


def run_cli(
    config: Path | None,
    *args: str,
    input: bytes = b"",
    env: Mapping[str, str | None] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    real_process: bool = False,
) -> CliResult:
    """Run `strongroom ARGS` with STRONGROOM_CONFIG=config; env entries of None are removed.
    A child of the fork server or a real process: see `run_strongroom`."""
    full = dict(os.environ)
    full.setdefault(VAULT_PASS_ENV, VAULT_PASSPHRASE)
    if config is not None:
        full["STRONGROOM_CONFIG"] = str(config)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    proc = run_strongroom(
        args, input=input, env=full, cwd=cwd, timeout=timeout, real_process=real_process
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


def run_strongroom(
    args: Sequence[str],
    *,
    input: bytes = b"",
    env: Mapping[str, str],
    cwd: Path | None = None,
    timeout: float | None = 60,
    real_process: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """`subprocess.run([strongroom, *args], input=input, capture_output=True, env=env, ...)`.

    It runs in a child of the fork server, which behaves as a fresh `strongroom` process
    (tests/cli_forkserver.py); in a real process when `real_process`, for the commands that
    serve or detach (`DETACHING_COMMANDS`), and when the environment, resource limits or
    ids differ from the server's in something a process reads only when it starts."""
    full = dict(env)
    # Cache bytecode outside the repository: each run then skips recompiling core/ (~15%).
    full.pop("PYTHONDONTWRITEBYTECODE", None)
    full.setdefault("PYTHONPYCACHEPREFIX", str(PYCACHE))
    argv = [str(STRONGROOM_BIN), *args]
    if real_process:
        why = "real_process=True"
    elif _command_of(args) in DETACHING_COMMANDS:
        why = f"{_command_of(args)} serves or detaches"
    else:
        server = fork_server()
        refusal = server.refusal(full)
        if refusal is None:
            CLI_CALLS["in a child of the fork server"] += 1
            done = server.run(args, input=input, env=full, cwd=cwd, timeout=timeout)
            return subprocess.CompletedProcess(argv, done.returncode, done.stdout, done.stderr)
        why = refusal
    CLI_CALLS[f"in a real process ({why})"] += 1
    return subprocess.run(
        argv, input=input, capture_output=True, env=full, cwd=cwd, timeout=timeout, check=False
    )


CliRunner = Callable[..., CliResult]


@pytest.fixture
def cli(vault_config: Path) -> CliRunner:
    """`cli("key", "list", input=b"...", env={...})` → (returncode, stdout bytes, stderr text)."""

    def run(*args: str, **kwargs: object) -> CliResult:
        return run_cli(vault_config, *args, **kwargs)  # type: ignore[arg-type]

    return run


# -- openssl, the tool nobody here wrote, checking our signatures -----------------------------
def in_mount_namespace(
    script: str, *args: str, env: Mapping[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run a Python `script` (with `args` in sys.argv[1:]) as root in a private mount
    namespace (`unshare --mount`): it may mount tmpfs or read-only binds that vanish with it.
    Needs root, since root ignores file modes: a read-only file system is the only way to
    make a directory unwritable for root."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=timeout,
        check=False,
    )


needs_mount_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a mount namespace"
)


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=30
    )


def openssl_verify(
    kind: str, cwd: Path, pub: str, sig: str, data: str
) -> subprocess.CompletedProcess[str]:
    if kind == "ed25519":
        return openssl(
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            pub,
            "-rawin",
            "-in",
            data,
            "-sigfile",
            sig,
            cwd=cwd,
        )
    if kind == "pss":
        return openssl(
            "dgst",
            "-sha256",
            "-verify",
            pub,
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:digest",
            "-signature",
            sig,
            data,
            cwd=cwd,
        )
    return openssl("dgst", kind, "-verify", pub, "-signature", sig, data, cwd=cwd)


def assert_openssl_verified(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Verified OK" in p.stdout or "Signature Verified Successfully" in p.stdout, p.stdout


def assert_openssl_rejected(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode != 0, p.stdout
    assert "Verified OK" not in p.stdout and "Verified Successfully" not in p.stdout
