"""`strongroom serve`, and the service's `tenant` and `policy` commands (admin)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .. import config as config_mod
from ..errors import InvalidArgument
from ._io import (
    StrongroomCommand,
    StrongroomSubGroup,
    read_input,
    table,
)
from ._state import State, pass_state


@click.command(cls=StrongroomCommand)
@click.option("--socket", "socket_path", metavar="PATH", help="Unix socket (overrides the config).")
@click.option("--listen", metavar="HOST:PORT", help="TCP with TLS (overrides the config).")
@click.option(
    "--kmip",
    metavar="HOST:PORT",
    help="Also serve KMIP with mutual TLS here (port 5696 if only HOST; docs/kmip.md).",
)
@click.option("--kmip-only", is_flag=True, help="Serve KMIP alone, without the HTTP service.")
@pass_state
def serve(
    state: State, socket_path: str | None, listen: str | None, kmip: str | None, kmip_only: bool
) -> None:
    """Run the key custody service until SIGTERM or SIGINT (docs/server.md).

    Listens on the Unix socket (default: serve.sock in the data dir, mode 0600) and, when
    configured, on TCP with TLS, and on KMIP (--kmip or [server] kmip_listen). At shutdown
    in-flight requests finish, then the vault is locked and guarded memory purged."""
    from ..service.transport import serve as run

    cfg = config_mod.load(state.config)
    settings = cfg.server
    if listen is not None:
        settings.listen = config_mod.parse_listen(listen)
    if kmip is not None:
        settings.kmip_listen = config_mod.parse_listen(kmip if ":" in kmip else f"{kmip}:5696")
    if kmip_only:
        if settings.kmip_listen is None:
            raise click.UsageError("--kmip-only needs --kmip or [server] kmip_listen")
        if listen is not None or socket_path is not None:
            raise click.UsageError("--kmip-only serves no HTTP: drop --listen and --socket")
        settings.listen = settings.socket = None
    else:
        if socket_path is not None:
            settings.socket = Path(socket_path)
        if settings.socket is None:
            settings.socket = cfg.data_dir / "serve.sock"
    state.server = ""

    def ready(where: list[str]) -> None:
        click.echo(f"strongroom: serving on {', '.join(where)}", err=True)

    run(cfg, settings, ready=ready)


def _tenants(state: State) -> Any:
    """The tenants store: local (file access to the data dir is admin), or the service's."""
    if state.remote():
        return state.service()
    from ..service.tenants import open_tenants

    def audit(operation: str, /, **facts: object) -> None:  # a tenants.sqlite moved in
        state.local_keystore().audit.record(operation, None, "ok", None, None, **facts)

    return open_tenants(config_mod.load(state.config), audit)


def _audit_change(state: State, operation: str, **detail: Any) -> Any:
    """Record a tenant or policy change in the audit log (the service records its own)."""
    if state.remote():
        return contextlib.nullcontext()
    return state.local_keystore().audited(operation, None, write_ahead=True, **detail)


@contextlib.contextmanager
def _tenant_store(state: State) -> Iterator[Any]:
    store = _tenants(state)
    try:
        yield store
    finally:
        if not state.remote():
            store.close()


@click.group(cls=StrongroomSubGroup)
def tenant() -> None:
    """Tenants of the custody service and their API tokens (admin)."""


@tenant.command("create")
@click.argument("name")
@pass_state
def tenant_create(state: State, name: str) -> None:
    """Create a tenant: a namespace of keys of its own."""
    with _tenant_store(state) as store, _audit_change(state, "tenant_create", tenant=name):
        store.create_tenant(name)
    state.emit({"tenant": name}, f"created tenant {name!r}")


@tenant.command("list")
@pass_state
def tenant_list(state: State) -> None:
    """List tenants and how many live identities each has."""
    with _tenant_store(state) as store:
        rows = store.tenants()
    state.emit(
        rows,
        lambda: table(
            [[r["name"], str(r.get("identities", ""))] for r in rows], ["TENANT", "IDENTITIES"]
        ),
    )


@tenant.group("token")
def tenant_token() -> None:
    """API tokens: issue (shown once) and revoke."""


def _identity_args(names: tuple[str, ...], admin: bool) -> tuple[str | None, str]:
    """TENANT IDENTITY, or with --admin the admin's IDENTITY alone."""
    if admin:
        if len(names) != 1:
            raise click.UsageError("with --admin give only the identity's name")
        return None, names[0]
    if len(names) != 2:
        raise click.UsageError("give TENANT and IDENTITY (or --admin IDENTITY)")
    return names[0], names[1]


@tenant_token.command("issue")
@click.argument("names", nargs=-1, required=True, metavar="TENANT IDENTITY")
@click.option("--admin", is_flag=True, help="A service admin (give IDENTITY only, no tenant).")
@click.option(
    "--grant",
    "grant",
    metavar="PERMS",
    help="Also grant these permissions (e.g. sign,verify,read) on --keys.",
)
@click.option("--keys", default="*", show_default=True, help="Key-name pattern for --grant.")
@pass_state
def tenant_token_issue(
    state: State, names: tuple[str, ...], admin: bool, grant: str | None, keys: str
) -> None:
    """Issue an API token for a new identity; print it once (only its hash is kept)."""
    from ..service.tenants import parse_permissions

    if admin and grant:
        raise click.UsageError("an admin holds no key permissions; --grant is for tenants")
    tenant_name, ident = _identity_args(names, admin)
    perms = parse_permissions(grant) if grant else None
    with (
        _tenant_store(state) as store,
        _audit_change(state, "token_issue", tenant=tenant_name, identity=ident, admin=admin),
    ):
        if state.remote():
            if admin:
                raise click.UsageError("admin tokens are issued on the service host, not remotely")
            token = store.issue_token(tenant_name, ident)
            if perms:
                store.grant(tenant_name, ident, keys, [p.value for p in perms])
        else:
            token = store.issue_token(tenant_name, ident, admin=admin)
            if perms and tenant_name is not None:
                store.grant(tenant_name, ident, keys, perms)
    state.emit(
        {"tenant": tenant_name, "identity": ident, "token": token},
        f"{token}\n(shown once: store it now; `tenant token revoke` disables it)",
    )


@tenant_token.command("revoke")
@click.argument("names", nargs=-1, required=True, metavar="TENANT IDENTITY")
@click.option("--admin", is_flag=True, help="Revoke a service admin (give IDENTITY only).")
@pass_state
def tenant_token_revoke(state: State, names: tuple[str, ...], admin: bool) -> None:
    """Revoke an identity's token (or certificate) at once."""
    tenant_name, ident = _identity_args(names, admin)
    with (
        _tenant_store(state) as store,
        _audit_change(state, "token_revoke", tenant=tenant_name, identity=ident),
    ):
        if state.remote():
            if tenant_name is None:
                raise click.UsageError("admin identities are revoked on the service host")
            store.revoke_identity(tenant_name, ident)
        else:
            store.revoke(tenant_name, ident)
    state.emit({"revoked": ident}, f"revoked {ident!r}")


@tenant.command("cert")
@click.argument("tenant_name", metavar="TENANT")
@click.argument("ident", metavar="IDENTITY")
@click.option("--cert", "cert", required=True, metavar="FILE", help="The client certificate (PEM).")
@pass_state
def tenant_cert(state: State, tenant_name: str, ident: str, cert: str) -> None:
    """Enroll a client certificate (mutual TLS) as an identity of TENANT (pinned by hash)."""
    import ssl

    pem = read_input(cert).decode("ascii", "replace")
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except ValueError:
        raise InvalidArgument(f"{cert} is not a PEM certificate") from None
    if state.remote():
        raise click.UsageError("certificates are enrolled on the service host")
    with (
        _tenant_store(state) as store,
        _audit_change(state, "token_issue", tenant=tenant_name, identity=ident, certificate=True),
    ):
        store.add_certificate(tenant_name, ident, der)
    state.emit({"tenant": tenant_name, "identity": ident}, f"enrolled {ident!r} in {tenant_name!r}")


@click.group(cls=StrongroomSubGroup)
def policy() -> None:
    """Who may do what to which keys, per tenant (deny by default)."""


PERMS_HELP = (
    "Comma-separated: read, sign, verify, encrypt, decrypt, agree, generate, delete, export, "
    "random, or all."
)


@policy.command("grant")
@click.argument("tenant_name", metavar="TENANT")
@click.argument("ident", metavar="IDENTITY")
@click.option("--keys", required=True, help="Key-name pattern (shell wildcards), e.g. 'app-*'.")
@click.option("--permissions", "perms", required=True, help=PERMS_HELP)
@pass_state
def policy_grant(state: State, tenant_name: str, ident: str, keys: str, perms: str) -> None:
    """Let IDENTITY (or '*', every identity of the tenant) do PERMISSIONS on matching keys."""
    from ..service.tenants import parse_permissions

    parsed = parse_permissions(perms)
    with (
        _tenant_store(state) as store,
        _audit_change(
            state,
            "policy_grant",
            tenant=tenant_name,
            identity=ident,
            keys=keys,
            permissions=",".join(sorted(parsed)),
        ),
    ):
        if state.remote():
            store.grant(tenant_name, ident, keys, [p.value for p in parsed])
        else:
            store.grant(tenant_name, ident, keys, parsed)
    state.emit(
        {"tenant": tenant_name, "identity": ident, "keys": keys, "permissions": sorted(parsed)},
        f"granted {', '.join(sorted(parsed))} on {keys!r} to {ident!r} in {tenant_name!r}",
    )


@policy.command("revoke")
@click.argument("tenant_name", metavar="TENANT")
@click.argument("ident", metavar="IDENTITY")
@click.option("--keys", required=True, help="The key-name pattern of the grant.")
@click.option("--permissions", "perms", help=PERMS_HELP + " Default: all of the grant.")
@pass_state
def policy_revoke(state: State, tenant_name: str, ident: str, keys: str, perms: str | None) -> None:
    """Take back permissions granted on a key pattern."""
    from ..service.tenants import parse_permissions

    parsed = parse_permissions(perms) if perms else None
    with (
        _tenant_store(state) as store,
        _audit_change(
            state,
            "policy_revoke",
            tenant=tenant_name,
            identity=ident,
            keys=keys,
            permissions="all" if parsed is None else ",".join(sorted(parsed)),
        ),
    ):
        if state.remote():
            store.revoke_policy(
                tenant_name, ident, keys, None if parsed is None else [p.value for p in parsed]
            )
        else:
            store.revoke_policy(tenant_name, ident, keys, parsed)
    state.emit({"revoked": True}, f"revoked on {keys!r} from {ident!r} in {tenant_name!r}")


@policy.command("list")
@click.option("--tenant", "tenant_name", help="Only this tenant's policies.")
@pass_state
def policy_list(state: State, tenant_name: str | None) -> None:
    """List policies."""
    with _tenant_store(state) as store:
        found = store.policies(tenant_name)
    rows = [p if isinstance(p, dict) else p.to_dict() for p in found]
    state.emit(
        rows,
        lambda: table(
            [[r["tenant"], r["identity"], r["keys"], ",".join(r["permissions"])] for r in rows],
            ["TENANT", "IDENTITY", "KEYS", "PERMISSIONS"],
        ),
    )
