"""The key custody service, `strongroom serve`, and its client (docs/server.md).

- `wire`: the table of operations (`OPS`) and the codecs both sides use;
- `openapi`: the OpenAPI document, generated from the table;
- `tenants`: tenants, identities and policies (the SQLite store);
- `app`: the ASGI app (match, authenticate, rate-limit, decode by operation, call the
  keystore, encode);
  with its mixins `keys` (access checks; generate, delete, agree, adopt, random) and
  `admin` (vault, audit, tenants, tokens, policies), and `codec` (`HttpError`, `Request`,
  the decoding of fields and encoding of answers);
- `transport`: serving the app under uvicorn (`serve()`);
- `client`: `RemoteKeystore`, the key API over the wire (imports only `wire` and the
  contract layer).

`connect()` is here rather than in `client` because it reads the config for its defaults.
"""

from __future__ import annotations

import os

from .. import config as _config
from ..secrets import SecretSource
from .client import TOKEN_ENV, RemoteKeystore, open_client, require_httpx


def connect(
    url: str | None = None,
    *,
    token: str | None = None,
    config: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
) -> RemoteKeystore:
    """Connect to a running `strongroom serve`.

    `url` is `unix:PATH` or `https://HOST:PORT`; by default `[server] url` from the config,
    else the service's default socket in the data dir. `token` defaults to `[server] token`
    (env:/file:), else $STRONGROOM_TOKEN. With a client certificate no token is needed.
    """
    require_httpx()
    cfg = _config.load(config)
    server = cfg.server
    url = url or server.url or f"unix:{server.socket or cfg.data_dir / 'serve.sock'}"
    if token is None and server.token is not None:
        token = SecretSource([server.token], "API token").get()
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    return open_client(
        url,
        token=token,
        ca=ca if ca is not None else server.ca,
        client_cert=client_cert if client_cert is not None else server.client_cert,
        client_key=client_key if client_key is not None else server.client_key,
        timeout=timeout,
    )


__all__ = ["connect"]
