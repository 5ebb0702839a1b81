"""`strongroom --server URL ssh-agent -D`: the agent as a client of `strongroom serve`, with a
tenant token that may only sign with and read `signing-*` keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import STRONGROOM_BIN
from server_support import Service, Tenancy, first_line, service_env, tenants_service

import strongroom
from strongroom import algorithms
from strongroom.api import requester


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Tenancy]]:
    with tenants_service(tmp_path_factory.mktemp("sshagent-service")) as running:
        yield running


def test_the_agent_serves_a_tenants_keys_through_the_service(
    service: tuple[Service, Tenancy], tmp_path: Path
) -> None:
    svc, tenancy = service
    with strongroom.connect(svc.unix, token=tenancy.acme_app) as app:
        app.generate("signing-ed", "ed25519")
        app.generate("signing-p256", "ecdsa-p256")
        app.generate("other-ed", "ed25519")  # the signer's token cannot read it
        expected = {
            name: algorithms.encode_public(app.public_key(name), "openssh").decode()
            for name in ("signing-ed", "signing-p256")
        }
    sock = Path(tempfile.mkdtemp(prefix="sr-agent-svc-")) / "agent.sock"
    env = {**service_env(), "STRONGROOM_TOKEN": tenancy.acme_signer}
    agent = subprocess.Popen(
        [
            *(str(STRONGROOM_BIN), "--server", svc.unix, "ssh-agent", "-D", "-a", str(sock)),
            *("--keys", "*-ed", "--keys", "*-p256"),
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = first_line(agent)
        assert line is not None, "the agent did not start"
        assert line == f"SSH_AUTH_SOCK={sock}; export SSH_AUTH_SOCK;\n"
        client_env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        listed = subprocess.run(
            ["ssh-add", "-L"], env=client_env, capture_output=True, text=True, timeout=60
        )
        assert sorted(listed.stdout.splitlines()) == sorted(
            f"{line} {name}" for name, line in expected.items()
        )
        pub = tmp_path / "signing-p256.pub"
        pub.write_text(expected["signing-p256"] + "\n")
        message = tmp_path / "message"
        message.write_text("signed by the service, asked by the agent\n")
        signed = subprocess.run(
            ["ssh-keygen", "-Y", "sign", "-n", "file", "-f", str(pub), str(message)],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert signed.returncode == 0, signed.stderr
        allowed = tmp_path / "allowed"
        allowed.write_text(f"app@acme {expected['signing-p256']}\n")
        verified = subprocess.run(
            [
                *("ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", "app@acme"),
                *("-n", "file", "-s", f"{message}.sig"),
            ],
            input=message.read_bytes(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert verified.returncode == 0, verified.stderr
        # The service's record names the token's identity as the actor, and the agent's
        # peer (this test's ssh-keygen) as the requester the agent sent with the request.
        records = [
            json.loads(line)
            for line in (svc.config.parent / "data" / "audit.jsonl").read_text().splitlines()
            if line.strip()
        ]
        signs = [r for r in records if r["op"] == "sign" and r["key"] == "acme/signing-p256"]
        assert signs and signs[-1]["result"] == "ok"
        assert signs[-1]["actor"] == "acme:signer"
        assert signs[-1]["requester"].startswith(f"ssh-agent[uid={os.getuid()} pid=")
        # A note that is not one printable header value is refused, not recorded.
        with strongroom.connect(svc.unix, token=tenancy.acme_signer) as direct:
            note = requester.set("bad\x7fnote")
            try:
                direct.sign("signing-p256", b"data")  # the client leaves a bad note out
            finally:
                requester.reset(note)
        unsigned = [
            json.loads(line)
            for line in (svc.config.parent / "data" / "audit.jsonl").read_text().splitlines()
            if line.strip()
        ][-1]
        assert unsigned["op"] == "sign" and "requester" not in unsigned
        with strongroom.connect(svc.unix, token=tenancy.admin) as admin:
            assert admin.audit_verify()["ok"] is True  # the chain holds the new field
        # The service itself refuses two notes, or one too long, with 400.
        auth = ("authorization", f"Bearer {tenancy.acme_signer}")
        transport = httpx.HTTPTransport(uds=str(svc.socket))
        with httpx.Client(transport=transport, base_url="http://strongroom") as http:
            for notes in (["a", "b"], ["x" * 257]):
                headers = [auth, *(("x-strongroom-requester", n) for n in notes)]
                assert http.get("/v1/keys", headers=headers).status_code == 400
            assert http.get("/v1/keys", headers=[auth]).status_code == 200
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    assert agent.returncode == 0, agent.stderr.read() if agent.stderr else ""
    assert not sock.exists()
    assert tenancy.acme_signer not in (agent.stderr.read() if agent.stderr else "")
