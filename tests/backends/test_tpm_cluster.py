"""One vault in a shared PostgreSQL store, each node unlocking it through a key slot sealed
by its own TPM (issue 21 point 2, docs/cluster.md): `strongroom vault enroll tpm` on a node
adds a slot that only that node's TPM opens; every node tries the TPM slots in turn and
opens the one sealed by its own, and a node whose TPM was never enrolled cannot unlock
through the TPM. Each node has its own swtpm (tests/emulators/tpm_support.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from conftest import CliResult, run_cli
from server_support import start_service
from tpm_support import PIN_ENV, TEST_PIN, VAULT_PASS, VAULT_PASS_ENV, Swtpm, swtpms, write_config

import strongroom
from strongroom.service.tenants import Permission, open_tenants

ENV = {PIN_ENV: TEST_PIN, VAULT_PASS_ENV: VAULT_PASS}
NODES = 3


def node(directory: Path, tcti: str, url: str, unlock: tuple[str, ...]) -> Path:
    directory.mkdir(exist_ok=True)
    cfg = write_config(
        directory,
        tcti,
        persistent=False,
        order=("vault",),
        unlock=unlock,
        name=f"strongroom-{'-'.join(unlock)}.toml",
    )
    text = cfg.read_text().replace(
        "\n[backends.vault]", f'\n[store]\nurl = "{url}"\n\n[backends.vault]'
    )
    cfg.write_text(text)
    return cfg


@pytest.fixture
def tpms(tmp_path: Path) -> Iterator[list[Swtpm]]:
    """A TPM of its own for each node."""
    with swtpms(tmp_path, NODES) as started:
        yield started


def cli(
    config: Path, *args: str, env: dict[str, str | None] | None = None, data: bytes = b""
) -> CliResult:
    return run_cli(config, *args, env={**ENV, **(env or {})}, input=data)


def test_each_node_opens_the_shared_vault_with_its_own_tpm_slot(
    pg_cluster: Any, tmp_path: Path, tpms: list[Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    url = pg_cluster.new_database()
    both = [
        node(tmp_path / f"n{i}", tpms[i].tcti, url, ("tpm", "passphrase")) for i in range(NODES)
    ]
    tpm_only = [node(tmp_path / f"n{i}", tpms[i].tcti, url, ("tpm",)) for i in range(NODES)]
    with strongroom.open(both[0]) as ks:
        ks.vault_control().initialize()  # a passphrase slot, in the database
        ks.generate("k", "ed25519")
    for cfg in both[:2]:  # nodes 0 and 1 enroll their TPMs; node 2 does not
        enrolled = cli(cfg, "--json", "vault", "enroll", "tpm")
        assert enrolled.returncode == 0, enrolled.stderr
        assert json.loads(enrolled.stdout)["method"] == "tpm"
    with strongroom.open(both[0]) as ks:
        ks.vault_control().unlock("passphrase")
        status = ks.vault_control().vault_status()
    methods = sorted(s["method"] for s in status["slots"])
    assert methods == ["passphrase", "tpm", "tpm"], status
    for i in (0, 1):  # without the passphrase: each opens through its own TPM's slot
        done = cli(tpm_only[i], "vault", "unlock", env={VAULT_PASS_ENV: None})
        assert done.returncode == 0 and b"with tpm" in done.stdout, done.stderr
        signed = cli(
            tpm_only[i], "key", "sign", "k", env={VAULT_PASS_ENV: None}, data=b"node %d" % i
        )
        assert signed.returncode == 0, signed.stderr
    refused = cli(tpm_only[2], "vault", "unlock", env={VAULT_PASS_ENV: None})
    assert refused.returncode == 9, refused.stderr  # IntegrityError: no slot of this TPM
    assert refused.stderr.count("\n") == 1, refused.stderr  # one line saying why
    assert "another TPM" in refused.stderr
    # with the passphrase as well, node 2 opens the vault and says which slots failed
    opened = cli(both[2], "--json", "vault", "unlock")
    assert opened.returncode == 0, opened.stderr
    report = json.loads(opened.stdout)
    assert report["unlocked"] and report["store"].startswith("user=")
    [failed] = report["unlock_failures"]
    assert failed["method"] == "tpm" and len(failed["slots"]) == 2
    assert "another TPM" in failed["reason"]
    for tpm in tpms:
        assert tpm.transient_handles() == []
        assert tpm.lockout_counter() == 0


def test_a_node_that_cannot_open_the_vault_serves_nothing_from_it_and_says_why(
    pg_cluster: Any, tmp_path: Path, tpms: list[Swtpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    url = pg_cluster.new_database()
    enrolled = node(tmp_path / "n0", tpms[0].tcti, url, ("tpm", "passphrase"))
    with strongroom.open(enrolled) as ks:
        ks.vault_control().initialize()
    assert cli(enrolled, "vault", "enroll", "tpm").returncode == 0
    lonely = node(tmp_path / "n1", tpms[1].tcti, url, ("tpm",))  # its TPM has no slot
    with lonely.open("a", encoding="utf-8") as f:
        f.write(f'\n[server]\nsocket = "{tmp_path / "n1" / "serve.sock"}"\nrate_limit = 0\n')
    tenants = open_tenants(strongroom.config.load(lonely))
    try:
        tenants.create_tenant("acme")
        token = tenants.issue_token("acme", "app")
        tenants.grant("acme", "app", "*", [Permission.GENERATE, Permission.READ])
        admin = tenants.issue_token(None, "root", admin=True)
    finally:
        tenants.close()
    monkeypatch.delenv(VAULT_PASS_ENV)  # this node has its TPM only
    service = start_service(lonely)
    try:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(service.socket)),
            base_url="http://strongroom",
            timeout=60,
        ) as c:
            made = c.post(
                "/v1/keys",
                json={"name": "k", "type": "ed25519"},
                headers={"authorization": f"Bearer {token}"},
            )
            assert made.status_code == 400, made.text  # nothing from the vault
            assert made.json()["error"]["type"] == "IntegrityError"
            status = c.get("/v1/vault", headers={"authorization": f"Bearer {admin}"})
            body = status.json()
            assert status.status_code == 200 and body["unlocked"] is False, body
            [failed] = body["unlock_failures"]
            assert failed["method"] == "tpm" and "another TPM" in failed["reason"], failed
    finally:
        service.stop()
    assert service.process.returncode == 0
    with psycopg.connect(url, autocommit=True) as pg:
        assert pg.execute("SELECT count(*) FROM keys").fetchone() == (0,)
