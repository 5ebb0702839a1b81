"""The CLI and config traps a new user hits (issue 13): config encoding, key-type case,
global options after the command, weak new passphrases, hints that name the fix, doctor's
core-dump check and binary output on a terminal. The real `strongroom` binary runs in a
subprocess; terminals are pseudo-terminals."""

from __future__ import annotations

import json
import os
import re
import resource
import select
import stat
import subprocess
import threading
import tty
from pathlib import Path

import pytest
from conftest import (
    STRONGROOM_BIN,
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    CliResult,
    run_cli,
    store_state,
    write_vault_config,
)

import strongroom
from strongroom.errors import InvalidArgument
from strongroom.types import KeyType, Usage

OK, USAGE, AUTH, CONFIG = 0, 2, 4, 11
DATA = b"data to sign\n"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def assert_ok(r: CliResult) -> CliResult:
    assert r.returncode == OK, f"rc={r.returncode} stderr={r.stderr!r}"
    return r


def one_line_error(r: CliResult, code: int, *contains: str) -> str:
    assert r.returncode == code, f"expected exit {code}, got {r.returncode}: {r.stderr!r}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("strongroom: "), r.stderr
    for text in contains:
        assert text in lines[0], r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A vault with an ed25519 key `signer` and an aes-256 key `aes`; returns its config."""
    cfg = write_vault_config(tmp_path_factory.mktemp("traps"))
    assert_ok(run_cli(cfg, "init"))
    assert_ok(run_cli(cfg, "key", "generate", "signer", "--type", "ed25519"))
    assert_ok(run_cli(cfg, "key", "generate", "aes", "--type", "aes-256"))
    return cfg


# -- config files -----------------------------------------------------------------------------
def test_a_config_that_is_not_utf8_is_a_config_error_naming_the_file_and_line(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[keystore]\nnamespace = "caf\u00e9"\n'.encode("latin-1"))
    line = one_line_error(run_cli(bad, "key", "list"), CONFIG, f"{bad}:2", "not UTF-8")
    assert "internal error" not in line
    with pytest.raises(strongroom.ConfigError) as info:
        strongroom.open(bad)
    assert info.value.path == str(bad) and info.value.line == 2


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text("[keystore\norder = [\n", encoding="utf-8")
    one_line_error(run_cli(bad, "key", "list"), CONFIG, str(bad), "not valid TOML")


# -- key types and usages in any case ---------------------------------------------------------
def test_key_types_and_usages_in_any_case_in_the_api() -> None:
    assert KeyType.parse("ED25519") is KeyType.ED25519
    assert KeyType.parse("Ecdsa-P256") is KeyType.ECDSA_P256
    assert KeyType.parse("ECDSA_P384") is KeyType.ECDSA_P384  # the Python member name
    assert Usage.parse_set("SIGN, Verify") == {Usage.SIGN, Usage.VERIFY}
    with pytest.raises(InvalidArgument, match="unknown key type"):
        KeyType.parse("ED-25519")


def test_key_types_in_any_case_in_the_cli(vault: Path) -> None:
    for name, given, stored in (
        ("up", "ED25519", "ed25519"),
        ("mixed", "Ecdsa-P256", "ecdsa-p256"),
    ):
        r = assert_ok(run_cli(vault, "--json", "key", "generate", name, "--type", given))
        assert json.loads(r.stdout)["type"] == stored
    r = assert_ok(
        run_cli(vault, "--json", "key", "generate", "u", "--type", "HMAC-SHA256", "--usage", "SIGN")
    )
    assert json.loads(r.stdout)["usage"] == ["sign"]
    one_line_error(run_cli(vault, "key", "generate", "x", "--type", "ROT13"), USAGE, "ROT13")


# -- global options after the command ---------------------------------------------------------
def test_global_options_work_after_the_command(vault: Path, tmp_path: Path) -> None:
    before = assert_ok(run_cli(vault, "--json", "key", "list")).stdout
    after = assert_ok(run_cli(vault, "key", "list", "--json")).stdout
    assert json.loads(before) == json.loads(after)
    assert {k["name"] for k in json.loads(after)} >= {"signer", "aes"}
    # --json between a group and its command, too
    assert json.loads(assert_ok(run_cli(vault, "key", "--json", "list")).stdout) == json.loads(
        after
    )
    # --config after the command wins over $STRONGROOM_CONFIG
    r = assert_ok(run_cli(tmp_path / "missing.toml", "key", "list", "--config", str(vault)))
    assert b"signer" in r.stdout
    # --debug after the command: the traceback, then the one-line error with its code
    r = run_cli(vault, "key", "show", "nope", "--debug")
    assert r.returncode == 3 and "Traceback" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("strongroom: error: no key named")
    # --server after the command: the CLI goes to that (absent) service
    r = run_cli(vault, "key", "list", "--server", f"unix:{tmp_path / 'no.sock'}")
    assert r.returncode != OK and "no.sock" in r.stderr
    # --help says so
    help_text = assert_ok(run_cli(vault, "key", "list", "--help")).stdout.decode()
    for option in ("--json", "--config FILE", "--debug", "--server URL"):
        assert option in help_text
    top = " ".join(assert_ok(run_cli(vault, "--help")).stdout.decode().split())
    assert "may also follow the command" in top


# -- weak new passphrases ---------------------------------------------------------------------
SHORT = "eleven char"  # 11 characters


def test_init_refuses_a_short_passphrase_without_allow_weak(tmp_path: Path) -> None:
    cfg = write_vault_config(tmp_path)
    r = run_cli(cfg, "init", env={VAULT_PASS_ENV: SHORT})
    line = one_line_error(r, USAGE, "shorter than 12 characters", "--allow-weak")
    assert SHORT not in line
    assert 'INSERT INTO "vault_headers"' not in store_state(cfg)  # no vault was made
    # a vault made on first use by another command is held to the same minimum
    r = run_cli(cfg, "key", "generate", "k", "--type", "ed25519", env={VAULT_PASS_ENV: SHORT})
    one_line_error(r, USAGE, "init --allow-weak")
    assert 'INSERT INTO "vault_headers"' not in store_state(cfg)  # no vault was made
    assert_ok(run_cli(cfg, "init", "--allow-weak", env={VAULT_PASS_ENV: SHORT}))
    assert_ok(
        run_cli(cfg, "key", "generate", "k", "--type", "ed25519", env={VAULT_PASS_ENV: SHORT})
    )
    # twelve characters need no flag
    (tmp_path / "twelve").mkdir()
    other = write_vault_config(tmp_path / "twelve")
    assert_ok(run_cli(other, "init", env={VAULT_PASS_ENV: SHORT + "!"}))


def test_passphrase_change_and_enroll_refuse_a_short_one_from_env_and_file(
    tmp_path: Path,
) -> None:
    cfg = write_vault_config(tmp_path)
    assert_ok(run_cli(cfg, "init"))
    secret = tmp_path / "new-pass"
    secret.write_text(SHORT + "\n", encoding="utf-8")
    secret.chmod(0o600)
    before = store_state(cfg)
    for args in (
        ("vault", "passphrase", "--new", "env:NEW_PASS"),
        ("vault", "passphrase", "--new", f"file:{secret}"),
        ("vault", "enroll", "passphrase", "--passphrase", "env:NEW_PASS"),
        ("vault", "enroll", "passphrase", "--passphrase", f"file:{secret}"),
    ):
        r = run_cli(cfg, *args, env={"NEW_PASS": SHORT})
        one_line_error(r, USAGE, "shorter than 12", "--allow-weak")
    assert store_state(cfg) == before
    r = run_cli(cfg, "vault", "passphrase", "--new", f"file:{secret}", "--allow-weak")
    assert_ok(r)
    assert_ok(run_cli(cfg, "vault", "unlock", env={VAULT_PASS_ENV: SHORT}))


# -- hints that name the fix ------------------------------------------------------------------
def run_without_terminal(config: Path, *args: str, env: dict[str, str | None]) -> CliResult:
    """Run the CLI in a new session: no controlling terminal, whatever runs the tests."""
    full = {**os.environ, "STRONGROOM_CONFIG": str(config), VAULT_PASS_ENV: VAULT_PASSPHRASE}
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    p = subprocess.run(
        [str(STRONGROOM_BIN), *args],
        input=DATA,
        capture_output=True,
        env=full,
        start_new_session=True,
        timeout=120,
        check=False,
    )
    return CliResult(p.returncode, p.stdout, p.stderr.decode())


def test_hints_name_the_environment_variable_or_option(tmp_path: Path) -> None:
    cfg = write_vault_config(tmp_path, passphrase_ref=f"env:{VAULT_PASS_ENV}")
    assert_ok(run_cli(cfg, "init"))
    assert_ok(run_cli(cfg, "key", "generate", "k", "--type", "ed25519"))
    r = run_without_terminal(cfg, "key", "sign", "k", env={VAULT_PASS_ENV: None})
    line = one_line_error(r, AUTH, f"set ${VAULT_PASS_ENV}")
    assert "in the config" not in line
    # env first, then a prompt, and no terminal: the variable is the fix
    both = write_vault_config(tmp_path, passphrase_ref="prompt", name="both.toml")
    text = both.read_text().replace('"prompt"', f'["env:{VAULT_PASS_ENV}", "prompt"]')
    both.write_text(text)
    r = run_without_terminal(both, "key", "sign", "k", env={VAULT_PASS_ENV: None})
    one_line_error(r, AUTH, "no terminal to ask on", f"set ${VAULT_PASS_ENV}")
    # an option that prompts by default names its own env: form
    r = run_without_terminal(cfg, "vault", "passphrase", env={})
    one_line_error(r, AUTH, "no terminal to ask on", "--new env:NAME")
    r = run_without_terminal(cfg, "vault", "enroll", "passphrase", env={})
    one_line_error(r, AUTH, "no terminal to ask on", "--passphrase env:NAME")


def test_a_service_refusing_a_client_without_token_names_strongroom_token(tmp_path: Path) -> None:
    from server_support import start_service

    cfg = write_vault_config(tmp_path)
    with cfg.open("a", encoding="utf-8") as f:
        f.write(f'\n[server]\nsocket = "{tmp_path / "s.sock"}"\n')
    assert_ok(run_cli(cfg, "init"))
    service = start_service(cfg)
    try:
        r = run_cli(cfg, "key", "list", "--server", service.unix, env={"STRONGROOM_TOKEN": None})
        one_line_error(r, AUTH, "$STRONGROOM_TOKEN")
        r = run_cli(cfg, "key", "list", "--server", service.unix, env={"STRONGROOM_TOKEN": "x"})
        line = one_line_error(r, AUTH)
        assert "sent no API token" not in line  # a token was sent; it was refused
    finally:
        service.stop()


# -- doctor -----------------------------------------------------------------------------------
def doctor_checks(config: Path, core_limit: int) -> dict[str, dict[str, str]]:
    def start_with_core_limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        want = core_limit if hard == resource.RLIM_INFINITY else min(core_limit, hard)
        resource.setrlimit(resource.RLIMIT_CORE, (want, hard))

    p = subprocess.run(
        [str(STRONGROOM_BIN), "--json", "doctor"],
        capture_output=True,
        env={**os.environ, "STRONGROOM_CONFIG": str(config), VAULT_PASS_ENV: VAULT_PASSPHRASE},
        preexec_fn=start_with_core_limit,  # only setrlimit, before exec
        timeout=120,
        check=False,
    )
    return {c["check"]: c for c in json.loads(p.stdout)}


def test_doctor_reports_the_core_limit_the_process_started_with_and_what_it_set(
    tmp_path: Path,
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip("the hard core limit is too low to start above 0")
    cfg = write_vault_config(tmp_path)
    core = doctor_checks(cfg, 4096)["core dumps"]
    assert core["status"] == "ok", core
    assert re.search(r"started with RLIMIT_CORE 4096\b", core["detail"]), core
    assert "Strongroom set RLIMIT_CORE 0, not dumpable" in core["detail"], core
    core = doctor_checks(cfg, 0)["core dumps"]
    assert "started with RLIMIT_CORE 0" in core["detail"], core
    # allowed by the config: a note, and the limit stays what the process started with
    allowed = write_vault_config(tmp_path, name="dumps.toml")
    allowed.write_text(
        allowed.read_text().replace("[keystore]\n", "[keystore]\ncore_dumps = true\n")
    )
    core = doctor_checks(allowed, 4096)["core dumps"]
    assert core["status"] == "note" and "started with RLIMIT_CORE 4096" in core["detail"], core
    assert "core_dumps = true" in core["detail"]


def test_doctor_checks_come_in_the_documented_order(vault: Path) -> None:
    checks = list(doctor_checks(vault, 0))
    documented = re.findall(
        r"^\| `([^`]+)` \|",
        (DOCS / "cli.md").read_text().split("### `strongroom doctor`")[1].split("\n### ")[0],
        re.MULTILINE,
    )
    assert [c for c in checks if not c.startswith("backend ")] == [
        d for d in documented if d != "backend NAME"
    ]
    assert documented[-1] == "backend NAME" and checks[-1] == "backend vault"


# -- binary output on a terminal --------------------------------------------------------------
def run_onto_terminal(config: Path, *args: str, input: bytes = b"") -> tuple[CliResult, bytes]:
    """Run the CLI with stdout on a pseudo-terminal (raw, so bytes arrive unchanged)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        p = subprocess.run(
            [str(STRONGROOM_BIN), *args],
            input=input,
            stdout=slave,
            stderr=subprocess.PIPE,
            env={**os.environ, "STRONGROOM_CONFIG": str(config), VAULT_PASS_ENV: VAULT_PASSPHRASE},
            timeout=120,
            check=False,
        )
        os.close(slave)
        slave = -1
        shown = b""
        while select.select([master], [], [], 0)[0]:
            try:
                piece = os.read(master, 65536)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not piece:
                break
            shown += piece
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return CliResult(p.returncode, b"", p.stderr.decode()), shown


BINARY_COMMANDS = [
    (("key", "sign", "signer"), DATA, "a signature"),
    (("key", "encrypt", "aes"), DATA, "a ciphertext"),
    (("key", "public", "signer", "--format", "der"), b"", "a der public key"),
    (("random", "16"), b"", "random bytes"),
    (("encrypt", "--key", "aes"), DATA, "an envelope"),
]


@pytest.mark.parametrize(
    ("args", "stdin", "what"), BINARY_COMMANDS, ids=[" ".join(a[:2]) for a, _, _ in BINARY_COMMANDS]
)
def test_binary_output_to_a_terminal_needs_out_dash(
    vault: Path, args: tuple[str, ...], stdin: bytes, what: str
) -> None:
    r, shown = run_onto_terminal(vault, *args, input=stdin)
    one_line_error(r, USAGE, what, "--out -")
    assert shown == b""
    r, shown = run_onto_terminal(vault, *args, "--out", "-", input=stdin)
    assert_ok(r)
    assert shown  # the bytes went to the terminal as asked
    # to a pipe, as before, without --out
    assert assert_ok(run_cli(vault, *args, input=stdin)).stdout


def test_text_output_to_a_terminal_is_fine(vault: Path) -> None:
    r, shown = run_onto_terminal(vault, "key", "public", "signer")
    assert_ok(r)
    assert shown.startswith(b"-----BEGIN PUBLIC KEY-----")
    r, shown = run_onto_terminal(vault, "random", "8", "--hex")
    assert_ok(r)
    assert len(bytes.fromhex(shown.decode().strip())) == 8


def test_decrypted_text_shows_on_a_terminal_but_binary_does_not(vault: Path) -> None:
    for command in (("key", "encrypt", "aes"), ("encrypt", "--key", "aes")):
        text_ct = assert_ok(run_cli(vault, *command, input=b"hello, terminal\n")).stdout
        binary_ct = assert_ok(run_cli(vault, *command, input=b"\x00\x01\xff\x1b[2J")).stdout
        decrypt = ("key", "decrypt", "aes") if command[0] == "key" else ("decrypt",)
        r, shown = run_onto_terminal(vault, *decrypt, input=text_ct)
        assert_ok(r)
        assert shown == b"hello, terminal\n"
        r, shown = run_onto_terminal(vault, *decrypt, input=binary_ct)
        one_line_error(r, USAGE, "decrypted data", "--out -")
        assert shown == b""
        r, shown = run_onto_terminal(vault, *decrypt, "--out", "-", input=binary_ct)
        assert_ok(r)
        assert shown == b"\x00\x01\xff\x1b[2J"


# -- output to a device or a FIFO --------------------------------------------------------------


def _special_files(tmp_path: Path) -> list[Path]:
    """A FIFO, and when we may make one (root), a null device of our own: --out targets that
    are not regular files. /dev/null itself is not used, so that a regression cannot change
    the machine's."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o644)
    found = [fifo]
    if os.geteuid() == 0:
        null = tmp_path / "null"
        try:
            os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:  # a container without CAP_MKNOD
            return found
        os.chmod(null, 0o666)
        found.append(null)
    return found


def _run_into(vault: Path, target: Path, *args: str, input: bytes) -> tuple[CliResult, bytes]:
    """Run the CLI with `--out target`; a FIFO's reader collects what it wrote."""
    if not stat.S_ISFIFO(os.stat(target).st_mode):
        return run_cli(vault, *args, "--out", str(target), input=input), b""
    got: list[bytes] = []

    def read() -> None:
        with open(target, "rb") as f:  # blocks until a writer opens it
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)  # never holds up pytest's exit
    reader.start()
    r = run_cli(vault, *args, "--out", str(target), input=input)
    if reader.is_alive():  # the CLI never opened the FIFO: release the reader
        os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
    reader.join(timeout=30)
    assert not reader.is_alive()
    return r, b"".join(got)


@pytest.mark.parametrize("command", ["key sign", "encrypt"])
def test_out_to_a_device_or_fifo_writes_in_place_and_keeps_the_node(
    vault: Path, tmp_path: Path, command: str
) -> None:
    """`--out /dev/null` as root once made /dev/null mode 0600 for the whole machine (the
    write path fchmod-ed whatever it opened), and the streaming path would have renamed a
    regular file over the device node. A special file is written in place, untouched."""
    args = ("key", "sign", "signer") if command == "key sign" else ("encrypt", "--key", "aes")
    for target in _special_files(tmp_path):
        before = os.stat(target)
        listing = sorted(os.listdir(tmp_path))
        r, written = _run_into(vault, target, *args, input=DATA)
        assert_ok(r)
        after = os.stat(target)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode), target
        assert stat.S_IMODE(after.st_mode) == stat.S_IMODE(before.st_mode), target
        assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev), target
        assert sorted(os.listdir(tmp_path)) == listing  # no temporary file left beside it
        if stat.S_ISFIFO(after.st_mode):  # what went through the FIFO is the real output
            if command == "key sign":
                sig = tmp_path / "sig"
                sig.write_bytes(written)
                assert_ok(run_cli(vault, "key", "verify", "signer", "--signature", str(sig),
                                  input=DATA))  # fmt: skip
            else:
                assert assert_ok(run_cli(vault, "decrypt", input=written)).stdout == DATA


def test_decrypt_to_a_fifo_releases_what_stdout_would_and_nothing_more(
    vault: Path, tmp_path: Path
) -> None:
    """A device or FIFO is written as stdout is: chunks as they authenticate. A failure
    (here the last chunk cut short) releases nothing beyond what stdout would have shown."""
    plain = os.urandom(5000)
    envelope = assert_ok(
        run_cli(vault, "encrypt", "--key", "aes", "--chunk-size", "1024", input=plain)
    ).stdout
    cut = envelope[:-7]
    on_stdout = run_cli(vault, "decrypt", input=cut)
    assert on_stdout.returncode != OK
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    r, written = _run_into(vault, fifo, "decrypt", input=cut)
    assert r.returncode == on_stdout.returncode
    assert written == on_stdout.stdout
    assert plain.startswith(written) and len(written) < len(plain)


# -- docs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_code_fences_in_docs_are_balanced(page: str) -> None:
    fences = [
        n
        for n, line in enumerate((DOCS / page).read_text(encoding="utf-8").splitlines(), 1)
        if line.lstrip().startswith("```")
    ]
    assert len(fences) % 2 == 0, f"{page}: an unclosed code fence; fence lines {fences}"
