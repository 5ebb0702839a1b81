"""`key sign --digest`, `key verify --digest`, and large inputs hashed in a stream.

ECDSA and RSA sign a digest of the message, so the CLI can hash a large input itself and
send only the digest: the same signature, checked here by openssl over the whole file, and
without the input in memory (the child's peak RSS stays below the input's size).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    STRONGROOM_BIN,
    VAULT_PASS_ENV,
    VAULT_PASSPHRASE,
    CliResult,
    assert_openssl_verified,
    openssl_verify,
    run_cli,
    write_vault_config,
)

from strongroom.cli.keyops import STREAM_MIN

USAGE = 2
BAD_SIG = 1


def ok(r: CliResult) -> CliResult:
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digest-vault")
    config = write_vault_config(root)
    ok(run_cli(config, "init"))
    for name, key_type in (("p256", "ecdsa-p256"), ("p384", "ecdsa-p384"), ("rsa", "rsa-2048")):
        ok(run_cli(config, "key", "generate", name, "--type", key_type))
    ok(run_cli(config, "key", "generate", "ed", "--type", "ed25519"))
    for name in ("p256", "p384", "rsa", "ed"):
        ok(run_cli(config, "key", "public", name, "--out", str(root / f"{name}.pem")))
    return config


@pytest.mark.parametrize(
    ("name", "hash_name", "kind", "algorithm"),
    [
        ("p256", "sha256", "-sha256", None),
        ("p384", "sha384", "-sha384", None),
        ("rsa", "sha256", "-sha256", None),
        ("rsa", "sha256", "pss", "pss"),
        ("rsa", "sha512", "-sha512", "pkcs1v15-sha512"),
    ],
)
def test_a_digest_signature_is_the_message_signature(
    vault: Path, name: str, hash_name: str, kind: str, algorithm: str | None
) -> None:
    root = vault.parent
    message = b"signed by its digest " * 10
    (root / "message").write_bytes(message)
    digest = hashlib.new(hash_name, message).digest()
    alg = ["--algorithm", algorithm] if algorithm else []
    sig = ok(run_cli(vault, "key", "sign", name, "--digest", *alg, input=digest)).stdout
    (root / f"{name}-{kind}.sig").write_bytes(sig)
    assert_openssl_verified(
        openssl_verify(kind, root, f"{name}.pem", f"{name}-{kind}.sig", "message")
    )
    # the whole message verifies it, and so does the digest
    sig_file = str(root / f"{name}-{kind}.sig")
    ok(run_cli(vault, "key", "verify", name, "--signature", sig_file, *alg, input=message))
    ok(
        run_cli(
            vault, "key", "verify", name, "--signature", sig_file, "--digest", *alg, input=digest
        )
    )
    other = hashlib.new(hash_name, message + b"!").digest()
    r = run_cli(
        vault, "key", "verify", name, "--signature", sig_file, "--digest", *alg, input=other
    )
    assert r.returncode == BAD_SIG


def test_a_digest_of_the_wrong_length_or_for_a_message_signer_is_refused(vault: Path) -> None:
    r = run_cli(vault, "key", "sign", "p384", "--digest", input=bytes(32))
    assert r.returncode == USAGE
    assert r.stderr.count("\n") == 1 and "48-byte SHA384 digest" in r.stderr, r.stderr
    r = run_cli(vault, "key", "sign", "ed", "--digest", input=bytes(32))
    assert r.returncode == USAGE
    assert r.stderr.count("\n") == 1 and "sign the whole message" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("name", "kind"), [("p256", "-sha256"), ("rsa", "-sha256"), ("ed", "ed25519")]
)
def test_a_large_input_signs_and_verifies(vault: Path, name: str, kind: str) -> None:
    root = vault.parent
    big = root / f"big-{name}"
    big.write_bytes(b"x" * (STREAM_MIN + 12345))
    sig = root / f"big-{name}.sig"
    ok(run_cli(vault, "key", "sign", name, "--in", str(big), "--out", str(sig)))
    assert_openssl_verified(openssl_verify(kind, root, f"{name}.pem", sig.name, big.name))
    ok(run_cli(vault, "key", "verify", name, "--signature", str(sig), "--in", str(big)))
    with big.open("rb") as stdin:  # from a pipe too, where the size is not known in advance
        r = subprocess.run(
            [str(STRONGROOM_BIN), "key", "verify", name, "--signature", str(sig)],
            stdin=stdin,
            capture_output=True,
            env=_env(vault),
            check=False,
            timeout=60,
        )
    assert r.returncode == 0, r.stderr
    big.write_bytes(b"x" * (STREAM_MIN + 12344) + b"y")
    r = run_cli(vault, "key", "verify", name, "--signature", str(sig), "--in", str(big))
    assert r.returncode == BAD_SIG


def _env(config: Path) -> dict[str, str]:
    return dict(os.environ, STRONGROOM_CONFIG=str(config), **{VAULT_PASS_ENV: VAULT_PASSPHRASE})


def test_signing_a_large_file_does_not_hold_it_in_memory(vault: Path) -> None:
    """A sparse 256 MiB file: read whole, the signing process would pass 256 MiB of RSS."""
    root = vault.parent
    big = root / "sparse"
    size = 256 << 20
    with big.open("wb") as f:
        f.truncate(size)
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "assert r.returncode == 0, r.stderr\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            str(STRONGROOM_BIN),
            "key",
            "sign",
            "p256",
            "--in",
            str(big),
            "--out",
            str(root / "sparse.sig"),
        ],
        capture_output=True,
        text=True,
        env=_env(vault),
        check=True,
        timeout=120,
    )
    peak = int(out.stdout) * 1024  # ru_maxrss is in KiB on Linux
    assert peak < size // 2, f"peak RSS {peak >> 20} MiB while signing a {size >> 20} MiB file"
    assert_openssl_verified(openssl_verify("-sha256", root, "p256.pem", "sparse.sig", "sparse"))
