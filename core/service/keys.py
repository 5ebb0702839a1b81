"""The key routes' access checks and the key routes with a handler of their own.

A mixin of `App` (app.py), split out along its banners (docs/decisions.md, "Modules split
along their banners"):

- authorisation: the keystore as a tenant sees it (`_view`), the permission checks on a key
  name (`_check_key`, `_key_request`), the admin check, and the vault seal an admin sets
  through the service (`_in_vault`, `_check_vault`); `_run` runs a call inline for a vault
  key and in a worker thread for hardware. The handlers compiled from `wire.OPS` (app.py)
  use them on every request, sign included;
- the routes `wire.OPS` leaves to a method of their own (`call=None`): generate and import,
  delete, agree, adopt and random.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization

from ..errors import KeyNotFound
from ..keystore import Keystore
from ..memory import wipe
from .codec import (
    HttpError,
    Request,
    b64,
    flag,
    int_query,
    key_json,
    opt_str,
    unb64,
    usage_list,
)
from .tenants import Identity, Permission, TenantStore
from .wire import NOT_FOUND

_EXPORTABLE_NEEDS_EXPORT = "making an exportable key needs export"


class KeyHandlers:
    """Access checks and key handlers, on the state of the `App` they are mixed into."""

    ks: Keystore
    tenants: TenantStore
    vault_sealed: bool
    _views: dict[str, Keystore]
    """The keystore of each tenant seen so far, made under `_lock`."""
    _lock: threading.Lock
    _vault_name: str

    # -- authorisation -------------------------------------------------------------------------
    def _view(self, identity: Identity) -> Keystore:
        """The keystore as the identity's tenant sees it: its namespace only."""
        tenant = identity.tenant
        if tenant is None:
            raise HttpError(403, "NotPermitted", "a service admin holds no keys; use a tenant")
        view = self._views.get(tenant)
        if view is None:
            with self._lock:
                view = self._views.get(tenant) or self.ks.in_namespace(tenant)
                self._views[tenant] = view
        return view

    def _check_key(self, identity: Identity, name: str, permission: Permission) -> Keystore:
        """The tenant's keystore if `identity` may `permission` the key `name`.

        Decided from the name alone, never from whether the key exists: a name the identity
        has no permission on at all gets the same 404 as an absent key (except to make a
        key, where "no such key" would make no sense: a 403, which says as little)."""
        view = self._view(identity)
        granted = self.tenants.permissions_on(identity, name)
        if permission not in granted:
            if not granted and permission is not Permission.GENERATE:
                raise HttpError(404, "KeyNotFound", NOT_FOUND)
            raise HttpError(
                403, "NotPermitted", f"this identity may not {permission.value} this key"
            )
        return view

    def _key_request(self, req: Request, permission: Permission) -> tuple[Keystore, str]:
        """The tenant's keystore and the key name of a /v1/keys/{name}/... request, once
        `permission` on that name is checked (see `_check_key`)."""
        assert req.identity is not None
        name = req.params["name"]
        return self._check_key(req.identity, name, permission), name

    def _admin(self, identity: Identity | None) -> None:
        if identity is None or not identity.admin:
            raise HttpError(403, "NotPermitted", "this needs the admin role")

    def _in_vault(self, view: Keystore, name: str) -> bool:
        """Whether the key lives in the vault; a 423 if so while an admin keeps it sealed."""
        try:
            backend = view.info(name).backend
        except KeyNotFound:
            raise HttpError(404, "KeyNotFound", NOT_FOUND) from None
        if backend != self._vault_name:
            return False
        if self.vault_sealed:
            raise HttpError(423, "VaultLocked", "the vault is locked; an admin unlocks it")
        return True

    def _check_vault(self, view: Keystore, name: str) -> None:
        if self.vault_sealed:
            self._in_vault(view, name)

    async def _run(self, view: Keystore, name: str, fn: Callable[[], Any]) -> Any:
        """Run a keystore call: inline for vault keys (fast), in a thread for hardware."""
        if self._in_vault(view, name):
            return fn()
        return await asyncio.to_thread(fn)

    async def generate(self, req: Request) -> Any:
        assert req.identity is not None
        body = req.body
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise HttpError(400, "InvalidArgument", "name is required")
        key_type = body.get("type")
        if not isinstance(key_type, str):
            raise HttpError(400, "InvalidArgument", "type is required")
        backend = opt_str(body, "backend")
        usage = usage_list(body)
        exportable = body.get("exportable", False)
        if not isinstance(exportable, bool):
            raise HttpError(400, "InvalidArgument", "exportable must be true or false")
        view = self._check_key(req.identity, name, Permission.GENERATE)
        if exportable and Permission.EXPORT not in self.tenants.permissions_on(req.identity, name):
            raise HttpError(403, "NotPermitted", _EXPORTABLE_NEEDS_EXPORT)
        if self.vault_sealed:
            raise HttpError(423, "VaultLocked", "the vault is locked; an admin unlocks it")
        if "material" in body:  # an import: the material goes straight into the backend
            material = bytearray(unb64(body.get("material"), "material"))
            fmt = body.get("format", "auto")
            if not isinstance(fmt, str):
                raise HttpError(400, "InvalidArgument", "format must be a string")
            try:
                info = await asyncio.to_thread(
                    view.import_key, name, key_type, material, backend, usage, exportable, fmt
                )
            finally:
                wipe(material)
            return 201, key_json(info)
        info = await asyncio.to_thread(
            view.generate, name, key_type, backend=backend, usage=usage, exportable=exportable
        )
        return 201, key_json(info)

    def _new_key_args(self, req: Request) -> tuple[str, str, list[str] | None, bytes, bytes]:
        """`new_name` (which the caller must be allowed to generate), `type`, `usage`, and
        the HKDF `salt` and `info` of an agree or derive request."""
        assert req.identity is not None
        new_name = req.body.get("new_name")
        if not isinstance(new_name, str) or not new_name:
            raise HttpError(400, "InvalidArgument", "new_name is required")
        self._check_key(req.identity, new_name, Permission.GENERATE)
        key_type = req.body.get("type", "aes-256")
        if not isinstance(key_type, str):
            raise HttpError(400, "InvalidArgument", "type must be a string")
        usage = usage_list(req.body)
        salt = unb64(req.body.get("salt", ""), "salt")
        info = unb64(req.body.get("info", ""), "info")
        return new_name, key_type, usage, salt, info

    def _check_exportable(self, req: Request, name: str) -> bool:
        """The request's `exportable` flag; making an exportable key needs `export` on it."""
        assert req.identity is not None
        exportable = flag(req.body, "exportable")
        if exportable and Permission.EXPORT not in self.tenants.permissions_on(req.identity, name):
            raise HttpError(403, "NotPermitted", _EXPORTABLE_NEEDS_EXPORT)
        return exportable

    async def delete_key(self, req: Request) -> Any:
        """Delete after the keystore's deletion_wait (or `?after=SECONDS`), or `?now=true`."""
        view, name = self._key_request(req, Permission.DELETE)
        self._check_vault(view, name)
        now_flag = req.query.get("now", "false")
        if now_flag not in ("true", "false"):
            raise HttpError(400, "InvalidArgument", "now is true or false")
        if now_flag == "true":
            await asyncio.to_thread(view.delete, name)
            return {"deleted": name}
        after = req.query.get("after")
        wait = None
        if after is not None:
            wait = timedelta(seconds=int_query(req.query, "after", 0, 0, 10 * 365 * 86400))
        scheduled = await asyncio.to_thread(view.schedule_deletion, name, wait)
        if scheduled is None or scheduled.delete_after is None:
            return {"deleted": name}
        return {"scheduled": name, "delete_after": scheduled.delete_after.isoformat()}

    async def agree(self, req: Request) -> Any:
        view, name = self._key_request(req, Permission.AGREE)
        new_name, key_type, usage, salt, info_bytes = self._new_key_args(req)
        peer = req.body.get("peer")
        if not isinstance(peer, str):
            raise HttpError(400, "InvalidArgument", "peer must be a PEM public key or base64")
        public: Any
        if peer.lstrip().startswith("-----BEGIN"):
            try:
                public = serialization.load_pem_public_key(peer.encode())
            except (ValueError, TypeError, UnicodeError):
                raise HttpError(400, "InvalidArgument", "peer is not a PEM public key") from None
        else:
            public = unb64(peer, "peer")  # raw or DER; the keystore reads it for the key type
        exportable = self._check_exportable(req, new_name)
        self._check_vault(view, name)
        info = await asyncio.to_thread(
            view.agree, name, public, new_name, key_type, usage, salt, info_bytes, exportable
        )
        return 201, key_json(info)

    async def adopt(self, req: Request) -> Any:
        """Register a key that already exists in a backend under this name: the `adopt`
        permission on the name, which `all` does not imply (in shared hardware, adopting
        claims a key nobody gave this tenant); the admin's vault seal stops it, as it stops
        generate."""
        assert req.identity is not None
        name = req.params["name"]
        backend = req.body.get("backend")
        if not isinstance(backend, str) or not backend:
            raise HttpError(400, "InvalidArgument", "backend is required")
        ref = req.body.get("ref")
        if not (
            isinstance(ref, dict)
            and ref
            and all(isinstance(k, str) and isinstance(v, str) for k, v in ref.items())
        ):
            raise HttpError(400, "InvalidArgument", "ref must be an object of strings")
        key_type = opt_str(req.body, "type")
        usage = usage_list(req.body)
        view = self._check_key(req.identity, name, Permission.ADOPT)
        if self.vault_sealed:
            raise HttpError(423, "VaultLocked", "the vault is locked; an admin unlocks it")
        info = await asyncio.to_thread(view.adopt, name, backend, ref, key_type, usage)
        return 201, key_json(info)

    async def random(self, req: Request) -> Any:
        ident = req.identity
        assert ident is not None
        if not self.tenants.may(ident, Permission.RANDOM):
            raise HttpError(403, "NotPermitted", "this identity may not ask for random bytes")
        n = req.body.get("n")
        if type(n) is not int or not 1 <= n <= 65536:
            raise HttpError(400, "InvalidArgument", "n must be an integer from 1 to 65536")
        backend = opt_str(req.body, "backend")
        if backend is not None and backend not in self.ks.config.backends:
            raise HttpError(400, "InvalidArgument", "no backend by that name")
        data = await asyncio.to_thread(self._view(ident).random, n, backend)
        return {"data": b64(data)}
