"""`strongroom.tenants`, kept for the names docs/server.md gives: the tenant store is now
`strongroom.service.tenants`. This module only re-exports it."""

from __future__ import annotations

from .service.tenants import (
    KEY_PERMISSIONS,
    Identity,
    NotPermitted,
    Permission,
    Policy,
    TenantNotFound,
    TenantStore,
    parse_permissions,
)

__all__ = [
    "KEY_PERMISSIONS",
    "Identity",
    "NotPermitted",
    "Permission",
    "Policy",
    "TenantNotFound",
    "TenantStore",
    "parse_permissions",
]
