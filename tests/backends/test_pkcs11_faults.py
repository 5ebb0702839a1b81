"""Parsec-style fault on the HSM (issue 16): SoftHSM2's token directory made read-only under
an open keystore. Key creation fails with a typed error and records nothing; keys already
there keep working; once the directory is writable again, the same Keystore object makes
keys again. No restart of Strongroom.

The directory is made read-only with a read-only bind mount in a mount namespace of the
test's own (we run as root, and root ignores file modes), so the child does the work.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import VAULT_PASS_ENV, VAULT_PASSPHRASE, in_mount_namespace, needs_mount_namespace
from pkcs11_support import PIN_ENV, USER_PIN, make_token, write_config

CHILD = r"""
import json, subprocess, sys
import strongroom
from strongroom.errors import StrongroomError

config, tokens = sys.argv[1], sys.argv[2]
out = {}

def attempt(name, call):
    try:
        call()
        out[name] = "ok"
    except StrongroomError as e:
        out[name] = {"error": type(e).__name__, "message": str(e)}
    except BaseException as e:  # the test's subject: anything untyped
        out[name] = {"untyped": type(e).__name__, "message": str(e)}

with strongroom.open(config) as ks:
    ks.generate("before", "ecdsa-p256", backend="hsm")
    ks.sign("before", b"m")
    subprocess.run(["mount", "--bind", tokens, tokens], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", tokens], check=True)
    attempt("generate_ro", lambda: ks.generate("during", "ecdsa-p256", backend="hsm"))
    attempt("import_ro", lambda: ks.import_key("during-aes", "aes-256", bytes(32), backend="hsm"))
    attempt("sign_ro", lambda: ks.sign("before", b"m"))
    out["names_ro"] = sorted(k.name for k in ks.keys())
    subprocess.run(["umount", tokens], check=True)
    attempt("generate_rw", lambda: ks.generate("after", "ecdsa-p256", backend="hsm"))
    attempt("sign_after", lambda: ks.sign("after", b"m"))
    attempt("sign_before", lambda: ks.sign("before", b"m"))
    out["names"] = sorted(k.name for k in ks.keys())
print(json.dumps(out))
"""


@needs_mount_namespace
def test_a_read_only_token_directory_is_typed_and_recovers(tmp_path: Path) -> None:
    hsm = make_token(tmp_path / "hsm")
    config = write_config(tmp_path, hsm)
    env = hsm.env(**{PIN_ENV: USER_PIN, VAULT_PASS_ENV: VAULT_PASSPHRASE})
    r = in_mount_namespace(CHILD, str(config), str(hsm.directory / "tokens"), env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    for attempt in ("generate_ro", "import_ro"):
        failed = out[attempt]
        assert isinstance(failed, dict) and failed.get("error") == "StorageError", out
        assert "could not save" in failed["message"] and "read-only" in failed["message"]
        assert USER_PIN not in failed["message"]
    assert out["sign_ro"] == "ok", out  # keys already on the token keep working
    assert out["names_ro"] == ["before"], "a refused key is not in the catalog"
    assert out["generate_rw"] == "ok" and out["sign_after"] == "ok", out
    assert out["sign_before"] == "ok", out
    assert out["names"] == ["after", "before"]
