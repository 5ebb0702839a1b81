"""`strongroom.server`, kept for the names docs/server.md gives: the service is now the
`strongroom.service` package (the app in `strongroom.service.app`, serving in
`strongroom.service.transport`). This module only re-exports them."""

from __future__ import annotations

from .service.app import App
from .service.codec import HttpError
from .service.transport import bind_unix_socket, serve, tls_context

__all__ = ["App", "HttpError", "bind_unix_socket", "serve", "tls_context"]
