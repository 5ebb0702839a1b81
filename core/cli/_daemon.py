"""Running a local server the way OpenSSH's agent runs (`ssh-agent`, `pkcs11-server`): bind
first, fork, let the child open the keystore and serve, and print the environment for a
shell only once the child serves; or serve in the foreground with -D.

The keystore is opened after the fork, in the serving process: a PKCS#11 or TPM session
does not survive a fork. A child that cannot open it (wrong passphrase, no token) exits
with that error's code, and the parent exits with the same code without printing anything
for the shell to eval.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from ..unixserver import UnixSocketServer
from ._io import EXIT_OTHER

READY = b"ready\n"


def detach_or_serve(
    server: UnixSocketServer,
    foreground: bool,
    environment: Callable[[int], str],
    serve: Callable[[int | None], None],
) -> None:
    """With -D, `serve(None)` here. Else fork: the child starts its own session and calls
    `serve(ready_fd)`; the parent waits for `READY` on that pipe, then prints
    `environment(child pid)` and returns."""
    if foreground:
        serve(None)
        return
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:  # the parent: wait until the child serves, then tell the shell where it is
        os.close(ready_w)
        server.detach()
        with os.fdopen(ready_r, "rb") as ready:
            status = ready.read(len(READY))
        if status != READY:  # the child failed, and printed why: exit with its code
            _, wait_status = os.waitpid(pid, 0)
            sys.exit(os.waitstatus_to_exitcode(wait_status) or EXIT_OTHER)
        click.echo(environment(pid), nl=False)
        return
    os.close(ready_r)
    os.setsid()
    serve(ready_w)


def serve_until_signal(
    server: UnixSocketServer,
    ready_fd: int | None,
    environment: str,
    logger_name: str,
    label: str,
) -> None:
    """Once the keystore is open: in the foreground print `environment` and log to stderr;
    detached, write `READY` to the waiting parent and drop the terminal. Serve until
    SIGTERM, SIGINT or SIGHUP, then close (and remove) the socket."""
    try:
        if ready_fd is None:
            click.echo(environment, nl=False)
            sys.stdout.flush()
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(f"{label}: %(message)s"))
            logger = logging.getLogger(logger_name)
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        else:
            os.write(ready_fd, READY)
            os.close(ready_fd)
            _to_dev_null()

        def stop(signum: int, frame: Any) -> None:
            server.shutdown()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, stop)
        server.serve_forever()
    finally:
        server.close()


def _to_dev_null() -> None:
    """A detached server keeps no terminal: stdin, stdout and stderr go to /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
