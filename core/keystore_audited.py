"""One audited keystore operation: `_Audited`, the context manager that writes its audit
record when the operation ends, and `_WRITE_AHEAD`, the operations that write a `started`
record before they act.

Moved verbatim out of keystore.py (docs/decisions.md, "Modules split along their banners");
the keystore, and through it the vault's audited commands, use it.
"""

from __future__ import annotations

from typing import Any

from .audit import Audit

_WRITE_AHEAD = frozenset(
    {
        "generate",
        "import",
        "adopt",
        "agree",
        "derive",
        "unwrap",
        "delete",
        "bip39_generate",
        "bip39_recover",
        "certificate_set",
        "slip10_derive",
        "repair_orphan",
    }
)
"""The keystore's operations that change state: a `started` record is written before they
act, so an unwritable log refuses them before a key is made or destroyed. (So are the
vault's commands, `vault_*`.) Callers of `Keystore.audited` say so with `write_ahead`."""


class _Audited:
    """Records one audit event when the operation ends, with its result (a class: hot path).

    If the record cannot be written, AuditUnavailable replaces the operation's result.
    """

    __slots__ = ("_audit", "_detail", "_facts", "_key", "_op", "_payload")

    def __init__(
        self, audit: Audit, op: str, key: str | None, detail: dict[str, Any], payload: Any = None
    ) -> None:
        self._audit, self._op, self._key, self._detail = audit, op, key, detail
        self._payload = payload
        self._facts: dict[str, Any] = {}

    def add_detail(self, **detail: Any) -> None:
        """Facts learned during the operation, for its result record (never secrets)."""
        self._detail = {**self._detail, **detail}

    def __enter__(self) -> dict[str, Any]:
        if self._op in _WRITE_AHEAD or self._op.startswith("vault_"):
            self._audit.record(self._op, self._key, "started", None, None, **self._detail)
        return self._facts

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        result = "ok" if exc_type is None else exc_type.__name__
        self._audit.record(
            self._op, self._key, result, self._facts.get("backend"), self._payload, **self._detail
        )


class _AuditedAhead(_Audited):
    """An `_Audited` that always writes its `started` record (`Keystore.audited(write_ahead=
    True)`); a class of its own so that the per-operation path of `_Audited` is unchanged."""

    __slots__ = ()

    def __enter__(self) -> dict[str, Any]:
        self._audit.record(self._op, self._key, "started", None, None, **self._detail)
        return self._facts
