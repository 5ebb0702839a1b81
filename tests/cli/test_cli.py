"""The `strongroom` console script, driven as a subprocess against a real vault in a temp dir.

Signatures are checked with the `openssl` command line, not with Strongroom's own code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    CliResult,
    assert_openssl_rejected,
    assert_openssl_verified,
    openssl,
    openssl_verify,
    run_cli,
    snapshot_path,
    store_state,
    write_vault_config,
)
from mnemonic import Mnemonic

from strongroom import errors
from strongroom.cli import EXIT_CODES, exit_code_of

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

ROOT = Path(__file__).resolve().parents[2]
KEY_HEADERS = ["NAME", "TYPE", "BACKEND", "USAGE", "EXPORTABLE", "CREATED"]
DATA = b"the quick brown fox signs the lazy dog\n"

# exit codes, as documented in core/cli.py and docs
OK, BAD_SIG, USAGE, NOT_FOUND, AUTH, UNSUPPORTED, UNAVAILABLE = 0, 1, 2, 3, 4, 5, 6
POLICY, CORRUPT, EXISTS, CONFIG, OTHER = 8, 9, 10, 11, 12


def assert_ok(r: CliResult) -> CliResult:
    assert r.returncode == OK, f"rc={r.returncode} stderr={r.stderr!r}"
    return r


def assert_one_line_error(r: CliResult, code: int, *contains: str) -> str:
    """Exit `code`; stderr is exactly one line 'strongroom: ...' without a traceback."""
    assert r.returncode == code, f"expected exit {code}, got {r.returncode}: {r.stderr!r}"
    assert r.stderr.endswith("\n"), r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("strongroom: "), r.stderr
    assert "Traceback" not in r.stderr
    for text in contains:
        assert text in lines[0], r.stderr
    return lines[0]


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


class Vault:
    """A vault made once per module for the tests that do not need a fresh one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = write_vault_config(root)
        self.snapshot = snapshot_path(self.config)

    def __call__(self, *args: str, **kwargs: object) -> CliResult:
        return run_cli(self.config, *args, cwd=self.root, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Vault:
    v = Vault(tmp_path_factory.mktemp("shared-vault"))
    assert_ok(v("init"))
    assert_ok(v("key", "generate", "signer", "--type", "ed25519"))
    assert_ok(v("key", "generate", "aes", "--type", "aes-256"))
    return v


@pytest.fixture
def fresh(tmp_path: Path) -> Vault:
    v = Vault(tmp_path)
    assert_ok(v("init"))
    return v


# -- init ----------------------------------------------------------------------------------------
def test_init_creates_the_vault_and_a_second_init_fails_in_one_line(
    cli: Callable[..., CliResult], vault_config: Path
) -> None:
    r = assert_ok(cli("init"))
    store = vault_config.parent / "data" / "catalog.sqlite"
    assert store.is_file() and not snapshot_path(vault_config).exists()
    assert str(store) in r.stdout.decode()
    before = store_state(vault_config)
    r = cli("init")
    assert_one_line_error(r, OTHER, "already exists")
    assert store_state(vault_config) == before


# -- signing, checked by openssl ----------------------------------------------------------------
SIGN_CASES = [
    # (key type, --algorithm, openssl verify args after the key and signature are known)
    ("ed25519", None, "ed25519"),
    ("ecdsa-p256", None, "-sha256"),
    ("ecdsa-p384", None, "-sha384"),
    ("secp256k1", None, "-sha256"),
    ("rsa-2048", None, "-sha256"),
    ("rsa-2048", "pss", "pss"),
]


@pytest.mark.parametrize(
    ("key_type", "algorithm", "kind"),
    SIGN_CASES,
    ids=[f"{t}-{a or 'default'}" for t, a, _ in SIGN_CASES],
)
def test_cli_signature_verifies_with_openssl(
    shared: Vault, key_type: str, algorithm: str | None, kind: str
) -> None:
    name = f"sig-{key_type}-{algorithm or 'default'}"
    r = assert_ok(shared("key", "generate", name, "--type", key_type))
    assert name in r.stdout.decode()
    alg = ["--algorithm", algorithm] if algorithm else []
    sig = assert_ok(shared("key", "sign", name, *alg, input=DATA)).stdout
    if key_type == "ed25519":
        assert len(sig) == 64
    elif key_type.startswith("rsa"):
        assert len(sig) == 256
    else:
        assert sig[0] == 0x30  # DER SEQUENCE
    d = shared.root / name
    d.mkdir()
    (d / "data").write_bytes(DATA)
    (d / "sig").write_bytes(sig)
    assert_ok(shared("key", "public", name, "--format", "pem", "--out", str(d / "pub.pem")))
    assert (d / "pub.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert_openssl_verified(openssl_verify(kind, d, "pub.pem", "sig", "data"))

    # one flipped bit in the signature, or in the data, and openssl says no
    (d / "badsig").write_bytes(flip(sig, len(sig) - 1))
    assert_openssl_rejected(openssl_verify(kind, d, "pub.pem", "badsig", "data"))
    (d / "baddata").write_bytes(flip(DATA, 0))
    assert_openssl_rejected(openssl_verify(kind, d, "pub.pem", "sig", "baddata"))

    if name not in ("sig-ed25519-default", "sig-rsa-2048-pss"):
        return  # each CLI run costs ~0.2 s: check `key verify` on two of the schemes
    # and Strongroom's own verify agrees: 0 for good, 1 for bad
    assert_ok(shared("key", "verify", name, "--signature", str(d / "sig"), *alg, input=DATA))
    r = shared("key", "verify", name, "--signature", str(d / "badsig"), *alg, input=DATA)
    assert r.returncode == BAD_SIG
    assert r.stderr == "strongroom: signature invalid\n"
    r = shared(
        "key", "verify", name, "--signature", str(d / "sig"), "--in", str(d / "baddata"), *alg
    )
    assert r.returncode == BAD_SIG


def test_sign_and_verify_with_files(shared: Vault) -> None:
    d = shared.root / "files"
    d.mkdir()
    (d / "data").write_bytes(DATA)
    assert_ok(shared("key", "sign", "signer", "--in", str(d / "data"), "--out", str(d / "sig")))
    assert len((d / "sig").read_bytes()) == 64
    r = assert_ok(
        shared("key", "verify", "signer", "--signature", str(d / "sig"), "--in", str(d / "data"))
    )
    assert b"valid" in r.stdout
    r = assert_ok(
        shared(
            "--json",
            "key",
            "verify",
            "signer",
            "--signature",
            str(d / "sig"),
            "--in",
            str(d / "data"),
        )
    )
    assert json.loads(r.stdout) == {"valid": True}


def test_public_key_formats(shared: Vault) -> None:
    raw = assert_ok(shared("key", "public", "signer", "--format", "raw")).stdout
    assert len(raw) == 32
    der = assert_ok(shared("key", "public", "signer", "--format", "der")).stdout
    assert der.endswith(raw)
    ssh = assert_ok(shared("key", "public", "signer", "--format", "openssh")).stdout
    assert ssh.startswith(b"ssh-ed25519 ")
    pem = assert_ok(shared("key", "public", "signer")).stdout
    p = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem, capture_output=True, check=True
    )
    assert p.stdout == der


# -- list and show -------------------------------------------------------------------------------
def test_key_list_table_and_json(shared: Vault) -> None:
    out = assert_ok(shared("key", "list")).stdout.decode()
    lines = out.splitlines()
    assert lines[0].split() == KEY_HEADERS
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["signer"][1:5] == ["ed25519", "vault", "sign,verify", "no"]
    assert rows["aes"][1:5] == ["aes-256", "vault", "decrypt,encrypt", "no"]

    data = json.loads(assert_ok(shared("--json", "key", "list")).stdout)
    assert isinstance(data, list)
    by_name = {k["name"]: k for k in data}
    assert set(by_name) == set(rows)
    assert by_name["signer"]["type"] == "ed25519"
    assert by_name["signer"]["backend"] == "vault"
    assert by_name["signer"]["usage"] == ["sign", "verify"]
    assert by_name["signer"]["exportable"] is False


def test_key_show(shared: Vault) -> None:
    out = assert_ok(shared("key", "show", "signer")).stdout.decode()
    assert "name: signer" in out
    assert "type: ed25519" in out
    assert "backend: vault" in out
    pem = assert_ok(shared("key", "public", "signer")).stdout.decode()
    assert pem.strip() in out
    data = json.loads(assert_ok(shared("--json", "key", "show", "signer")).stdout)
    assert data["name"] == "signer"
    assert data["public_key"].strip() == pem.strip()
    # a symmetric key has no public part
    data = json.loads(assert_ok(shared("--json", "key", "show", "aes")).stdout)
    assert data["type"] == "aes-256"
    assert "public_key" not in data


# -- encrypt and decrypt -------------------------------------------------------------------------
@pytest.mark.parametrize("key_type", ["aes-256", "chacha20-poly1305"])
def test_encrypt_decrypt_round_trip(shared: Vault, key_type: str) -> None:
    name = f"enc-{key_type}"
    assert_ok(shared("key", "generate", name, "--type", key_type))
    plain = os.urandom(3000) + b"secret message"
    d = shared.root / name
    d.mkdir()
    (d / "plain").write_bytes(plain)

    # through files
    assert_ok(shared("key", "encrypt", name, "--in", str(d / "plain"), "--out", str(d / "ct")))
    ct = (d / "ct").read_bytes()
    assert plain not in ct and len(ct) > len(plain)
    assert_ok(shared("key", "decrypt", name, "--in", str(d / "ct"), "--out", str(d / "back")))
    assert (d / "back").read_bytes() == plain

    # through stdin and stdout, with associated data
    ct2 = assert_ok(shared("key", "encrypt", name, "--aad", "ctx-1", input=plain)).stdout
    assert ct2 != ct  # fresh nonce
    assert assert_ok(shared("key", "decrypt", name, "--aad", "ctx-1", input=ct2)).stdout == plain

    # the wrong associated data, or none, or a flipped byte: one line, exit 9, no plaintext
    cases = [(["--aad", "ctx-2"], ct2)]
    if key_type == "aes-256":  # the rest once: each CLI run costs ~0.2 s
        cases += [([], ct2), (["--aad", "ctx-1"], flip(ct2, len(ct2) // 2))]
    for args, data in cases:
        r = shared("key", "decrypt", name, *args, input=data)
        assert_one_line_error(r, CORRUPT, "failed authentication")
        assert r.stdout == b""
    if key_type != "aes-256":
        return
    # decrypting with another key of the same type fails too
    assert_ok(shared("key", "generate", name + "-other", "--type", key_type))
    assert_one_line_error(shared("key", "decrypt", name + "-other", input=ct), CORRUPT)


def test_rsa_oaep_round_trip(shared: Vault) -> None:
    assert_ok(shared("key", "generate", "oaep", "--type", "rsa-2048", "--usage", "encrypt,decrypt"))
    ct = assert_ok(shared("key", "encrypt", "oaep", input=b"hi there")).stdout
    assert len(ct) == 8 + 256  # the key-version prefix (docs/lifecycle.md), then RSA-2048 OAEP
    assert assert_ok(shared("key", "decrypt", "oaep", input=ct)).stdout == b"hi there"
    # openssl can encrypt to the public key, and the vault decrypts it
    d = shared.root / "oaep"
    d.mkdir()
    assert_ok(shared("key", "public", "oaep", "--out", str(d / "pub.pem")))
    (d / "msg").write_bytes(b"from openssl")
    p = openssl(
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        "pub.pem",
        "-in",
        "msg",
        "-out",
        "ct",
        "-pkeyopt",
        "rsa_padding_mode:oaep",
        "-pkeyopt",
        "rsa_oaep_md:sha256",
        "-pkeyopt",
        "rsa_mgf1_md:sha256",
        cwd=d,
    )
    assert p.returncode == 0, p.stderr
    r = assert_ok(shared("key", "decrypt", "oaep", "--in", str(d / "ct")))
    assert r.stdout == b"from openssl"


# -- import and export ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key_type", "genpkey", "verify"),
    [
        ("ed25519", ["-algorithm", "ed25519"], "ed25519"),
        ("ecdsa-p256", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"], "-sha256"),
    ],
)
def test_import_openssl_key_sign_and_verify_with_openssl(
    shared: Vault, key_type: str, genpkey: list[str], verify: str
) -> None:
    d = shared.root / f"import-{key_type}"
    d.mkdir()
    p = openssl("genpkey", *genpkey, "-out", "k.pem", cwd=d)
    assert p.returncode == 0, p.stderr
    p = openssl("pkey", "-in", "k.pem", "-pubout", "-out", "pub.pem", cwd=d)
    assert p.returncode == 0, p.stderr
    name = f"imported-{key_type}"
    r = assert_ok(shared("key", "import", name, "--type", key_type, "--in", str(d / "k.pem")))
    assert "imported" in r.stdout.decode()
    # the public key Strongroom reports is openssl's
    ours = assert_ok(shared("key", "public", name)).stdout
    assert ours == (d / "pub.pem").read_bytes()
    sig = assert_ok(shared("key", "sign", name, input=DATA)).stdout
    (d / "sig").write_bytes(sig)
    (d / "data").write_bytes(DATA)
    assert_openssl_verified(openssl_verify(verify, d, "pub.pem", "sig", "data"))

    # not exportable: refused with the policy exit code, nothing on stdout
    r = shared("key", "export", name)
    assert_one_line_error(r, POLICY, "exportable")
    assert r.stdout == b""


def test_import_from_stdin_and_export_when_exportable(shared: Vault, tmp_path: Path) -> None:
    p = openssl("genpkey", "-algorithm", "ed25519", "-out", "k.pem", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    pem = (tmp_path / "k.pem").read_bytes()
    assert_ok(shared("key", "import", "exp", "--type", "ed25519", "--exportable", input=pem))
    out = tmp_path / "exported.pem"
    out.write_bytes(b"an older, world-readable file")
    out.chmod(0o644)
    assert_ok(shared("key", "export", "exp", "--out", str(out)))
    assert out.stat().st_mode & 0o777 == 0o600  # the private key is not left world-readable
    # same private key: openssl derives the same public key from both
    a = openssl("pkey", "-in", "k.pem", "-pubout", cwd=tmp_path)
    b = openssl("pkey", "-in", "exported.pem", "-pubout", cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout


def test_a_secret_goes_in_and_out_raw(shared: Vault) -> None:
    """`key import --type secret` keeps opaque bytes (no usage); `key export --format raw`
    gives them back; `key generate` does not offer the type."""
    secret = b"correct horse\x00battery\xffstaple\n"
    r = assert_ok(
        shared("key", "import", "db-pass", "--type", "secret", "--exportable", input=secret)
    )
    assert "imported secret key 'db-pass'" in r.stdout.decode()
    assert assert_ok(shared("key", "export", "db-pass", "--format", "raw")).stdout == secret
    r = shared("key", "generate", "nope", "--type", "secret")
    assert r.returncode == USAGE and "secret" in r.stderr


def test_import_garbage_is_a_usage_error(shared: Vault) -> None:
    assert_one_line_error(
        shared(
            "key",
            "import",
            "junk",
            "--type",
            "ed25519",
            "--format",
            "pem",
            input=b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
        ),
        USAGE,
    )
    r = shared("key", "show", "junk")
    assert_one_line_error(r, NOT_FOUND)


# -- delete ---------------------------------------------------------------------------------------
def test_delete_then_show_is_not_found(shared: Vault) -> None:
    assert_ok(shared("key", "generate", "doomed", "--type", "ed25519"))
    r = assert_ok(shared("key", "delete", "doomed"))
    assert "deleted" in r.stdout.decode()
    assert_one_line_error(shared("key", "show", "doomed"), NOT_FOUND, "doomed")
    assert_one_line_error(shared("key", "sign", "doomed", input=DATA), NOT_FOUND)
    assert_one_line_error(shared("key", "delete", "doomed"), NOT_FOUND)
    names = [k["name"] for k in json.loads(shared("--json", "key", "list").stdout)]
    assert "doomed" not in names


# -- unsupported, random -------------------------------------------------------------------------
def test_unknown_backend_is_a_usage_error_naming_it(shared: Vault) -> None:
    r = shared("key", "generate", "x", "--type", "ed25519", "--backend", "nosuch")
    assert_one_line_error(r, USAGE, "nosuch")
    assert_one_line_error(shared("key", "show", "x"), NOT_FOUND)


def test_random(shared: Vault) -> None:
    r = assert_ok(shared("random", "16", "--hex"))
    text = r.stdout.decode().strip()
    assert len(text) == 32
    int(text, 16)
    raw = assert_ok(shared("random", "16")).stdout
    assert len(raw) == 16
    again = assert_ok(shared("random", "16")).stdout
    assert raw != again
    assert len(bytes.fromhex(json.loads(shared("--json", "random", "8").stdout)["hex"])) == 8
    assert_one_line_error(shared("random", "0"), USAGE)


# -- wrong passphrase ----------------------------------------------------------------------------
def test_wrong_passphrase_is_exit_4_and_leaves_the_snapshot_alone(shared: Vault) -> None:
    before = store_state(shared.config)
    listing = sorted(p.name for p in shared.snapshot.parent.iterdir())
    for args in (["key", "sign", "signer"], ["key", "generate", "n", "--type", "ed25519"]):
        r = shared(*args, input=DATA, env={VAULT_PASS_ENV: "not the passphrase"})
        line = assert_one_line_error(r, AUTH, "passphrase")
        assert "not the passphrase" not in line
        assert VAULT_PASSPHRASE not in line
        assert r.stdout == b""
    assert store_state(shared.config) == before
    assert sorted(p.name for p in shared.snapshot.parent.iterdir()) == listing
    assert_one_line_error(shared("key", "show", "n"), NOT_FOUND)
    # the passphrase env var unset altogether: also an authentication failure, not a crash
    r = shared("key", "sign", "signer", input=DATA, env={VAULT_PASS_ENV: None})
    assert_one_line_error(r, AUTH, VAULT_PASS_ENV)
    assert store_state(shared.config) == before


# -- backends, doctor ----------------------------------------------------------------------------
def test_backends_table_and_json(shared: Vault) -> None:
    lines = assert_ok(shared("backends")).stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["NAME", "TYPE", "STATUS"]
    vault_row = next(line for line in lines[1:] if line.split()[0] == "vault")
    assert vault_row.split()[1:3] == ["vault", "available"]
    assert "ed25519" in vault_row and "rsa-4096" in vault_row

    data = json.loads(assert_ok(shared("--json", "backends")).stdout)
    assert isinstance(data, list)
    vault = next(b for b in data if b["name"] == "vault")
    assert vault["type"] == "vault"
    assert vault["available"] is True
    assert vault["reason"] is None
    assert "sign" in vault["capabilities"]["ed25519"]
    assert "encrypt" in vault["capabilities"]["aes-256"]


def test_doctor(shared: Vault) -> None:
    r = shared("doctor")
    if os.geteuid() == 0:
        assert_ok(r)
    else:
        assert r.returncode in (OK, OTHER)
    out = r.stdout.decode()
    assert out.splitlines()[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert "native extension" in out and "mlock limit" in out and "backend vault" in out
    checks = {c["check"]: c for c in json.loads(shared("--json", "doctor").stdout)}
    assert checks["native extension"]["status"] == "ok"
    assert checks["config"]["detail"] == str(shared.config)
    assert checks["backend vault"]["status"] == "ok"


# -- vault commands ------------------------------------------------------------------------------
def slot_ids(v: Vault, env: dict[str, str | None] | None = None) -> list[str]:
    r = assert_ok(v("--json", "vault", "unlock", env=env))
    return [s["id"] for s in json.loads(r.stdout)["slots"]]


def test_vault_status_unlock_lock(fresh: Vault) -> None:
    status = json.loads(assert_ok(fresh("--json", "vault", "status")).stdout)
    assert status["exists"] is True
    assert status["unlocked"] is False
    store = fresh.snapshot.parent / "catalog.sqlite"
    assert status["store"] == str(store)
    text = assert_ok(fresh("vault", "status")).stdout.decode()
    assert f"store: {store}" in text
    assert_ok(fresh("key", "generate", "k", "--type", "ed25519"))
    r = assert_ok(fresh("vault", "unlock"))
    assert r.stdout.decode().strip() == "vault unlocked with passphrase: 1 keys"
    data = json.loads(assert_ok(fresh("--json", "vault", "unlock")).stdout)
    assert data["unlocked"] is True and data["keys"] == 1
    assert [s["method"] for s in data["slots"]] == ["passphrase"]
    assert "argon2id" in data["slots"][0]["kdf"]
    assert VAULT_PASSPHRASE not in r.stdout.decode() + json.dumps(data)
    r = assert_ok(fresh("vault", "lock"))
    assert "locked" in r.stdout.decode()


def test_vault_status_before_init(cli: Callable[..., CliResult], vault_config: Path) -> None:
    status = json.loads(assert_ok(cli("--json", "vault", "status")).stdout)
    assert status["exists"] is False and status["unlocked"] is False


def test_vault_passphrase_change(fresh: Vault) -> None:
    assert_ok(fresh("key", "generate", "k", "--type", "ed25519"))
    old_ids = slot_ids(fresh)
    r = assert_ok(
        fresh(
            "vault", "passphrase", "--new", "env:NEWPASS", env={"NEWPASS": "a brand new passphrase"}
        )
    )
    assert "changed" in r.stdout.decode()
    before = store_state(fresh.config)
    assert_one_line_error(fresh("vault", "unlock"), AUTH)
    assert_one_line_error(fresh("key", "sign", "k", input=DATA), AUTH)
    assert store_state(fresh.config) == before
    new_env: dict[str, str | None] = {VAULT_PASS_ENV: "a brand new passphrase"}
    new_ids = slot_ids(fresh, new_env)
    assert len(new_ids) == 1 and new_ids != old_ids
    sig = assert_ok(fresh("key", "sign", "k", input=DATA, env=new_env)).stdout
    assert len(sig) == 64
    # a reference that is not env:/file:/prompt is refused as a usage error
    assert_one_line_error(fresh("vault", "passphrase", "--new", "hunter2", env=new_env), USAGE)
    # a missing env var: no change
    r = fresh("vault", "passphrase", "--new", "env:SR_TEST_UNSET_VAR", env=new_env)
    assert_one_line_error(r, AUTH)
    assert store_state(fresh.config) == before


def test_vault_enroll_second_passphrase_and_unenroll(fresh: Vault) -> None:
    assert_ok(fresh("key", "generate", "k", "--type", "ed25519"))
    (first,) = slot_ids(fresh)
    r = assert_ok(
        fresh(
            "vault",
            "enroll",
            "passphrase",
            "--passphrase",
            "env:SECOND",
            env={"SECOND": "the second passphrase"},
        )
    )
    assert "enrolled passphrase" in r.stdout.decode()
    second_env: dict[str, str | None] = {VAULT_PASS_ENV: "the second passphrase"}
    ids = slot_ids(fresh)
    assert len(ids) == 2 and ids[0] == first
    second = ids[1]
    assert slot_ids(fresh, second_env) == ids
    assert len(assert_ok(fresh("key", "sign", "k", input=DATA, env=second_env)).stdout) == 64

    # remove the first slot, with the second passphrase: now only the second opens it
    assert_ok(fresh("vault", "unenroll", first, env=second_env))
    assert_one_line_error(fresh("vault", "unlock"), AUTH)
    assert slot_ids(fresh, second_env) == [second]
    # the last slot cannot go; nothing changes
    before = store_state(fresh.config)
    r = fresh("vault", "unenroll", second, env=second_env)
    assert_one_line_error(r, POLICY, "last")
    assert store_state(fresh.config) == before
    assert_one_line_error(fresh("vault", "unenroll", "nosuchslot", env=second_env), USAGE)
    assert slot_ids(fresh, second_env) == [second]


def test_vault_backup_and_restore(fresh: Vault) -> None:
    assert_ok(fresh("key", "generate", "keeper", "--type", "ecdsa-p256"))
    sig = assert_ok(fresh("key", "sign", "keeper", input=DATA)).stdout
    pub = assert_ok(fresh("key", "public", "keeper")).stdout
    backup = fresh.root / "backup.snap"
    r = assert_ok(fresh("vault", "backup", str(backup)))
    assert "backed up" in r.stdout.decode()
    assert backup.read_bytes()[:10] == b"SRVAULT\x00\x00\x03"

    assert_ok(fresh("key", "delete", "keeper"))
    assert_ok(fresh("key", "generate", "later", "--type", "ed25519"))
    assert_one_line_error(fresh("key", "show", "keeper"), NOT_FOUND)

    report = json.loads(assert_ok(fresh("--json", "vault", "restore", str(backup))).stdout)
    assert report["keys"] == 1
    assert report["added"] == ["keeper"]
    assert report["removed"] == ["later"]
    assert report["conflicts"] == []
    assert_ok(fresh("key", "show", "keeper"))
    assert_one_line_error(fresh("key", "show", "later"), NOT_FOUND)
    assert assert_ok(fresh("key", "public", "keeper")).stdout == pub
    (fresh.root / "sig").write_bytes(sig)
    (fresh.root / "msg").write_bytes(DATA)
    (fresh.root / "pub.pem").write_bytes(pub)
    assert_ok(fresh("key", "verify", "keeper", "--signature", str(fresh.root / "sig"), input=DATA))
    assert_openssl_verified(openssl_verify("-sha256", fresh.root, "pub.pem", "sig", "msg"))
    # and the restored key still signs
    sig2 = assert_ok(fresh("key", "sign", "keeper", input=DATA)).stdout
    (fresh.root / "sig2").write_bytes(sig2)
    assert_openssl_verified(openssl_verify("-sha256", fresh.root, "pub.pem", "sig2", "msg"))


def test_vault_restore_of_a_damaged_backup_changes_nothing(fresh: Vault) -> None:
    assert_ok(fresh("key", "generate", "k", "--type", "ed25519"))
    backup = fresh.root / "backup.snap"
    assert_ok(fresh("vault", "backup", str(backup)))
    data = backup.read_bytes()
    backup.write_bytes(data[: len(data) // 2])
    before = store_state(fresh.config)
    assert_one_line_error(fresh("vault", "restore", str(backup)), CORRUPT, "truncated")
    assert store_state(fresh.config) == before
    assert_one_line_error(fresh("vault", "restore", str(fresh.root / "missing")), USAGE)
    assert_ok(fresh("key", "show", "k"))


# -- BIP39 and SLIP-0010 -------------------------------------------------------------------------
def test_bip39_generate_and_slip10_derive(shared: Vault) -> None:
    r = assert_ok(shared("key", "bip39-generate", "seed", "--words", "12"))
    words = r.stdout.decode().split()
    assert len(words) == 12
    m = Mnemonic("english")
    assert all(w in m.wordlist for w in words)
    assert m.check(" ".join(words))
    info = json.loads(assert_ok(shared("--json", "key", "show", "seed")).stdout)
    assert info["type"] == "seed"
    assert "public_key" not in info

    r = assert_ok(shared("key", "slip10-derive", "seed", "m/44'/0'", "child", "--type", "ed25519"))
    assert "child" in r.stdout.decode()
    d = shared.root / "slip10"
    d.mkdir()
    sig = assert_ok(shared("key", "sign", "child", input=DATA)).stdout
    (d / "sig").write_bytes(sig)
    (d / "data").write_bytes(DATA)
    assert_ok(shared("key", "public", "child", "--out", str(d / "pub.pem")))
    assert_openssl_verified(openssl_verify("ed25519", d, "pub.pem", "sig", "data"))

    # recovering the same mnemonic and deriving the same path gives the same key
    assert_ok(shared("key", "bip39-recover", "seed2", input=" ".join(words).encode() + b"\n"))
    assert_ok(shared("key", "slip10-derive", "seed2", "m/44'/0'", "child2"))
    assert assert_ok(shared("key", "public", "child2")).stdout == (d / "pub.pem").read_bytes()
    # another path gives another key
    assert_ok(shared("key", "slip10-derive", "seed", "m/44'/1'", "child3"))
    assert assert_ok(shared("key", "public", "child3")).stdout != (d / "pub.pem").read_bytes()


# -- --debug -------------------------------------------------------------------------------------
def test_debug_shows_a_traceback_and_keeps_the_exit_code(shared: Vault) -> None:
    plain = shared("key", "show", "no-such-key")
    assert_one_line_error(plain, NOT_FOUND)
    debug = shared("--debug", "key", "show", "no-such-key")
    assert "Traceback (most recent call last)" in debug.stderr
    assert "KeyNotFound" in debug.stderr
    assert debug.returncode == NOT_FOUND
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()

    env: dict[str, str | None] = {VAULT_PASS_ENV: "wrong"}
    debug = shared("--debug", "key", "sign", "signer", input=DATA, env=env)
    assert "Traceback (most recent call last)" in debug.stderr
    assert "AuthenticationFailed" in debug.stderr
    assert debug.returncode == AUTH


# -- every exit code -----------------------------------------------------------------------------
def test_exit_codes(shared: Vault, tmp_path: Path) -> None:
    # 10: the name exists
    assert_one_line_error(
        shared("key", "generate", "signer", "--type", "ecdsa-p256"), EXISTS, "signer"
    )
    # 8: usage policy (an ed25519 key may not encrypt; an aes key may not sign)
    assert_one_line_error(shared("key", "encrypt", "signer", input=b"x"), POLICY, "encrypt")
    assert_one_line_error(shared("key", "sign", "aes", input=b"x"), POLICY, "sign")
    # 2: a usage the type cannot have, an unknown type, a bad option
    assert_one_line_error(
        shared("key", "generate", "x", "--type", "x25519", "--usage", "sign"), USAGE, "sign"
    )
    assert_one_line_error(shared("key", "generate", "x", "--type", "rot13"), USAGE, "rot13")
    assert_one_line_error(shared("key", "generate", "x"), USAGE, "--type")
    assert_one_line_error(shared("--no-such-option", "key", "list"), USAGE)
    assert_one_line_error(shared("no-such-command"), USAGE)
    assert_one_line_error(shared("key", "sign", "signer", "--algorithm", "pss", input=b"x"), USAGE)
    assert_one_line_error(
        shared("key", "generate", "bad name!", "--type", "ed25519"), USAGE, "key names"
    )
    # 3: no such key
    assert_one_line_error(shared("key", "public", "nope"), NOT_FOUND, "nope")
    # 5: the vault cannot AES-key-wrap under an RSA key even where the usage allows wrap
    assert_ok(shared("key", "generate", "rsa-kek", "--type", "rsa-2048", "--usage", "wrap"))
    assert_ok(shared("key", "generate", "movable", "--type", "aes-256", "--exportable"))
    assert_one_line_error(shared("key", "wrap", "rsa-kek", "movable"), UNSUPPORTED, "vault")
    # 0 with --help
    assert assert_ok(shared("key", "generate", "--help")).stdout.startswith(b"Usage:")

    # 6: backend unavailable (create = false and no snapshot yet)
    cfg = write_vault_config(tmp_path, extra_vault="create = false\n")
    r = run_cli(cfg, "key", "generate", "k", "--type", "ed25519")
    assert_one_line_error(r, UNAVAILABLE, "strongroom init")
    assert store_state(cfg) == "" or "vault_headers VALUES" not in store_state(cfg)

    # 11: config error, naming the file and line
    bad = tmp_path / "bad.toml"
    bad.write_text('[keystore]\ncolour = "blue"\n', encoding="utf-8")
    assert_one_line_error(run_cli(bad, "key", "list"), CONFIG, f"{bad}:2", "colour")
    assert_one_line_error(run_cli(tmp_path / "missing.toml", "key", "list"), CONFIG, "not found")

    # 9: a damaged snapshot
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    cfg = write_vault_config(damaged)
    assert_ok(run_cli(cfg, "init"))
    backup = damaged / "backup.snap"
    assert_ok(run_cli(cfg, "vault", "backup", str(backup)))
    data = backup.read_bytes()
    backup.write_bytes(data[:-10])
    assert_one_line_error(run_cli(cfg, "vault", "restore", str(backup)), CORRUPT, "truncated")
    assert backup.read_bytes() == data[:-10]
    db = sqlite3.connect(damaged / "data" / "catalog.sqlite")
    with db:
        db.execute(
            "UPDATE vault_headers SET manifest=replace(manifest, '\"count\": 0', '\"count\": 1')"
        )
    db.close()
    assert_one_line_error(run_cli(cfg, "key", "generate", "k", "--type", "ed25519"), CORRUPT)

    # 7 (device locked) has no vault trigger; see the report.


def test_the_exit_code_table_is_the_one_in_docs() -> None:
    """docs/cli.md's table names each class of `EXIT_CODES` on its code's row, and every
    strongroom error it names gets that row's code from the CLI."""
    section = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = section.split("## Errors and exit codes")[1].split("\n## ")[0]
    named: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            for name in re.findall(r"`(\w+)`", cells[2]):
                named[name] = int(cells[0])
    classes = {
        name: cls
        for name, cls in vars(errors).items()
        if isinstance(cls, type) and issubclass(cls, errors.StrongroomError)
    }
    listed = {cls.__name__: code for cls, code in EXIT_CODES.items()}
    assert {n: named.get(n) for n in listed} == listed
    documented = {n: code for n, code in named.items() if n in classes}
    assert {n: exit_code_of(classes[n]) for n in documented} == documented
    assert len(documented) >= len(listed) + 1  # PresenceTimeout and GuardedMemoryError too


def test_config_flag_overrides_the_environment(shared: Vault, tmp_path: Path) -> None:
    r = run_cli(tmp_path / "missing.toml", "--config", str(shared.config), "key", "list")
    assert_ok(r)
    assert b"signer" in r.stdout
