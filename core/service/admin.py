"""The service's admin routes: the vault (status, lock, unlock), the audit log (records,
verify, checkpoint), tenants, identities, tokens and policies. A mixin of `App` (app.py),
split out along its banners (docs/decisions.md, "Modules split along their banners"): the
route table (`wire.OPS`, `admin=True`) names these methods, and `App` wraps each in its
admin check when it compiles the table, so none of them checks the caller itself.

Every change to tenants and policies is written ahead to the audit log, through the
keystore's `audited(..., write_ahead=True)`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..audit import chain_records, last_seq, read_records, verify_chain, verify_log
from ..keystore import Keystore
from .codec import HttpError, Request, int_query, jsonable, opt_str, policy_body
from .tenants import TenantStore, parse_permissions


class AdminHandlers:
    """The admin handlers, on the keystore and tenant store of the `App` they are mixed into."""

    ks: Keystore
    tenants: TenantStore
    vault_sealed: bool
    """`vault lock` through the service: refused with a 423 until `vault unlock`."""

    # -- vault ---------------------------------------------------------------------------------
    async def vault_status(self, req: Request) -> Any:
        status = self.ks.vault_control().vault_status()
        return {**jsonable(status), "sealed_by_service": self.vault_sealed}

    async def vault_lock(self, req: Request) -> Any:
        self.vault_sealed = True
        await asyncio.to_thread(self.ks.vault_control().lock)
        return {"locked": True}

    async def vault_unlock(self, req: Request) -> Any:
        method = opt_str(req.body, "method")
        used = await asyncio.to_thread(self.ks.vault_control().unlock, method)
        self.vault_sealed = False
        return {"locked": False, "method": used}

    # -- audit ---------------------------------------------------------------------------------
    async def audit_records(self, req: Request) -> Any:
        path = self.ks.config.data_dir / "audit.jsonl"
        chain = self.ks.audit.chain  # the chain in the shared store, if there is one
        limit = int_query(req.query, "limit", 100, 1, 10_000)
        if "last" in req.query:  # the newest N records
            if "since" in req.query:
                raise HttpError(400, "InvalidArgument", "give since or last, not both")
            last = int_query(req.query, "last", 100, 1, 10_000)
            if chain is not None:
                newest = (await asyncio.to_thread(chain.tail))[0]
            else:
                newest = await asyncio.to_thread(last_seq, path)
            since, limit = max(0, newest - last), last
        else:
            since = int_query(req.query, "since", 0, 0, 1 << 62)
        if chain is not None:
            records = await asyncio.to_thread(chain_records, chain, since, limit)
        else:
            records = await asyncio.to_thread(read_records, path, since, limit)
        return {"records": records}

    async def audit_verify(self, req: Request) -> Any:
        path = self.ks.config.data_dir / "audit.jsonl"
        chain = self.ks.audit.chain
        public = await asyncio.to_thread(self.ks.audit_public_key)
        if chain is not None:
            report = await asyncio.to_thread(verify_chain, chain, public)
        else:
            report = await asyncio.to_thread(verify_log, path, public)
        return report.to_dict()

    async def audit_checkpoint(self, req: Request) -> Any:
        record = await asyncio.to_thread(self.ks.audit_checkpoint)
        return {"checkpoint": record}

    # -- tenants and policies ------------------------------------------------------------------
    async def list_tenants(self, req: Request) -> Any:
        return {"tenants": self.tenants.tenants()}

    async def create_tenant(self, req: Request) -> Any:
        name = req.body.get("name")
        if not isinstance(name, str):
            raise HttpError(400, "InvalidArgument", "name is required")
        with self.ks.audited("tenant_create", None, write_ahead=True, tenant=name):
            await asyncio.to_thread(self.tenants.create_tenant, name)
        return 201, {"name": name}

    async def issue_token(self, req: Request) -> Any:
        name = req.body.get("name")
        if not isinstance(name, str):
            raise HttpError(400, "InvalidArgument", "name is required")
        tenant = req.params["tenant"]
        with self.ks.audited("token_issue", None, write_ahead=True, tenant=tenant, identity=name):
            token = await asyncio.to_thread(self.tenants.issue_token, tenant, name)
        return 201, {"tenant": tenant, "name": name, "token": token}

    async def revoke_identity(self, req: Request) -> Any:
        tenant, name = req.params["tenant"], req.params["name"]
        with self.ks.audited("token_revoke", None, write_ahead=True, tenant=tenant, identity=name):
            await asyncio.to_thread(self.tenants.revoke, tenant, name)
        return {"revoked": req.params["name"]}

    async def list_policies(self, req: Request) -> Any:
        tenant = req.query.get("tenant")
        return {"policies": [p.to_dict() for p in self.tenants.policies(tenant)]}

    async def grant(self, req: Request) -> Any:
        tenant, identity, keys, perms = policy_body(req.body)
        if perms is None:
            raise HttpError(400, "InvalidArgument", "permissions are required")
        parsed = parse_permissions(perms)
        with self.ks.audited(
            "policy_grant",
            None,
            write_ahead=True,
            tenant=tenant,
            identity=identity,
            keys=keys,
            permissions=",".join(sorted(parsed)),
        ):
            policy = await asyncio.to_thread(self.tenants.grant, tenant, identity, keys, parsed)
        return policy.to_dict()

    async def revoke_policy(self, req: Request) -> Any:
        tenant, identity, keys, perms = policy_body(req.body)
        parsed = None if perms is None else parse_permissions(perms)
        with self.ks.audited(
            "policy_revoke",
            None,
            write_ahead=True,
            tenant=tenant,
            identity=identity,
            keys=keys,
            permissions="all" if parsed is None else ",".join(sorted(parsed)),
        ):
            await asyncio.to_thread(self.tenants.revoke_policy, tenant, identity, keys, parsed)
        return {"revoked": True}
