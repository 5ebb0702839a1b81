"""Audit events: who did what, with which key, and the result. Never a secret.

Sinks: `file` appends JSON lines to `audit.jsonl` in the data dir (one `write` per
event on an O_APPEND descriptor, so lines from several processes never interleave),
`log` sends them to the `strongroom.audit` logger, `off` drops them.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

AuditEvent = dict[str, Any]
logger = logging.getLogger("strongroom.audit")

current_principal: ContextVar[str | None] = ContextVar("strongroom_principal", default=None)
"""Who the current operation is done for, when that is not this process's user: a server
sets it per request (a tenant's identity), and the event records it as `actor`."""


def default_actor() -> str:
    """The OS user, host and process: who this process acts for."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry for this uid: still audit by number
        user = f"uid:{os.getuid()}"
    return f"{user}@{socket.gethostname()}[{os.getpid()}]"


class Audit:
    """Records one event per keystore operation."""

    def __init__(self, mode: str, path: Path | None, actor: str | None = None) -> None:
        self.mode = mode
        self.actor = actor or default_actor()
        self._actor_json = json.dumps(self.actor)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.listeners: list[Callable[[AuditEvent], None]] = []
        if mode == "file" and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def record(
        self,
        operation: str,
        key: str | None,
        result: str,
        backend: str | None = None,
        **detail: Any,
    ) -> None:
        """Append one event. `detail` must hold only non-secret facts (types, sizes, names)."""
        principal = current_principal.get()
        if self.listeners or self.mode == "log":
            event: AuditEvent = {
                "time": time.time(),
                "actor": self.actor if principal is None else principal,
                "op": operation,
                "key": key,
                "backend": backend,
                "result": result,
                **detail,
            }
            for listener in self.listeners:
                listener(event)
            if self.mode == "log":
                logger.info("%s", json.dumps(event, sort_keys=True))
        if self._fd is None:
            return
        # Built by hand: this runs on every operation and json.dumps of a dict is slow.
        actor = self._actor_json if principal is None else _js(principal)
        line = (
            f'{{"time":{time.time():.6f},"actor":{actor},"op":{_js(operation)},'
            f'"key":{_js(key)},"backend":{_js(backend)},"result":{_js(result)}'
        )
        for name, value in detail.items():
            encoded = str(value) if isinstance(value, int) else _js(str(value))
            line += f',"{name}":{encoded}'
        data = (line + "}\n").encode()
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, data)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _js(value: str | None) -> str:
    return "null" if value is None else _encode_str(value)


_encode_str = encode_basestring_ascii
