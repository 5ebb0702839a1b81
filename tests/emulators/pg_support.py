"""A private PostgreSQL cluster for the store tests: Debian's server, one per test session.

`initdb` into a new temporary directory, then `pg_ctl start` with the server listening only
on a Unix socket in that directory (no TCP port, so nothing on the machine can collide with
it or reach it), trust authentication for the one role. initdb and the server refuse to run
as root: as root, they run as the `postgres` user (Debian's package makes it), else
`nobody`, through setpriv, and the directory is theirs. Each test gets a database of its
own (`PgCluster.new_database`).

`fsync=off`: the cluster lives as long as the test session and a machine crash loses it
anyway; commits are still acknowledged only once PostgreSQL has them (synchronous_commit
stays on), so a server killed mid-test keeps every acknowledged transaction.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

    from strongroom.audit import VerifyReport

ROLE = "strongroom"


def bin_dir() -> Path:
    """Debian installs the server's programs in /usr/lib/postgresql/VERSION/bin; elsewhere
    they are on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError(
            "PostgreSQL's initdb is not installed (bash scripts/setup.sh installs postgresql)"
        )
    return Path(initdb).parent


def _as_owner() -> tuple[list[str], int, int]:
    """The command prefix that runs the server's programs, and the uid and gid they run as."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    return prefix, user.pw_uid, user.pw_gid


def _null_prefix(root: Path) -> list[str]:
    """When /dev/null is root's alone, the prefix that gives the programs a null device of
    their own. initdb's and pg_ctl's shells redirect into /dev/null, which they run too
    unprivileged to open then. Some containers ship it so; and until cli/_io.py stopped
    fchmod-ing special files, `strongroom ... --out /dev/null` run as root (tests/
    test_hostile.py) made it so mid-run, which broke a later pg_ctl restart: so this is
    decided at every command, not once per cluster. The programs (and the server pg_ctl
    forks) then run in a private mount namespace with a world-writable null device bound
    over /dev/null; the socket, in `root`, is reachable from outside as before."""
    if os.geteuid() != 0 or os.stat("/dev/null").st_mode & 0o006 == 0o006:
        return []
    null = root / "null"
    if not null.exists():
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(null, 0o666)
    return [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount --bind "$0" /dev/null && exec "$@"', str(null),
    ]  # fmt: skip


class PgCluster:
    """One running cluster in `root`, reached over the socket in it."""

    def __init__(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="strongroom-pg-")
        self.root = Path(self._tmp)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._bin = bin_dir()
        self._prefix, uid, gid = _as_owner()
        os.chown(self.root, uid, gid)
        os.chmod(self.root, 0o700)  # the socket's directory: its owner (and root) only
        self._names = itertools.count(1)
        self.running = False

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [*_null_prefix(self.root), *self._prefix, str(self._bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
            )

    def init(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", ROLE, "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = (
            f"-k {self.root} -c listen_addresses='' -c fsync=off -c full_page_writes=off "
            "-c max_connections=60 -c shared_buffers=16MB"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "120", "start")  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
            self.running = False

    def url(self, database: str = "postgres") -> str:
        """A libpq URL for `database` over the cluster's socket (the host is its directory)."""
        return f"postgresql://{ROLE}@/{database}?host={self.root}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(database), autocommit=True)

    def new_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PgCluster:
    cluster = PgCluster()
    try:
        cluster.init()
        cluster.start()
    except BaseException:
        log = cluster.log.read_text(errors="replace")[-2000:] if cluster.log.exists() else ""
        cluster.cleanup()
        if log:
            raise RuntimeError(f"PostgreSQL did not start; its log ends:\n{log}") from None
        raise
    return cluster


def verify_store_chain(url: str, public_key: PublicKeyTypes | None = None) -> VerifyReport:
    """verify_chain over the audit chain in the database at `url` (opened and closed here)."""
    from strongroom.audit import verify_chain
    from strongroom.store_chain import open_chain

    chain = open_chain(url)
    try:
        return verify_chain(chain, public_key)
    finally:
        chain.close()
