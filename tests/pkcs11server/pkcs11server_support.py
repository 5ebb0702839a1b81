"""What the PKCS#11 server tests share: a Pkcs11Server on its own thread."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from strongroom.keystore import Keystore
from strongroom.pkcs11server import Pkcs11Server, Settings


@contextlib.contextmanager
def serving(ks: Keystore, settings: Settings, name: str) -> Iterator[Pkcs11Server]:
    """A Pkcs11Server for `ks` on a socket in a fresh directory (sr-NAME-*), served on a
    daemon thread (test-NAME); shut down, joined and closed on leaving."""
    socket_dir = Path(tempfile.mkdtemp(prefix=f"sr-{name}-"))
    os.rmdir(socket_dir)  # the server makes it (0700) and removes it again
    srv = Pkcs11Server(ks, settings, socket_dir / "p11.sock")
    thread = threading.Thread(target=srv.serve_forever, name=f"test-{name}", daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        thread.join(timeout=30)
        srv.close()
