"""A fork server for the CLI tests: `strongroom ARGS` without starting an interpreter each time.

Starting the `strongroom` console script costs 0.3-0.4 s, nearly all of it the interpreter
and the import of strongroom.cli (cryptography, click, ...). The suite runs it several
hundred times. `ForkServer` starts one process (this file run as a script) that imports
what the console script imports and then, for each call, forks a child that turns itself
into a fresh `strongroom` process and runs the console script's own code
(docs/decisions.md, "Fast CLI tests: a fork server").

What makes the child the same as a process the kernel started from the script:

- the server is a fresh interpreter started with the environment of the suite (not a fork
  of pytest): no thread, no guarded memory, no backend imported (it checks all three
  before serving), signal handlers as Python sets them;
- the child gets, as a subprocess would: stdin, stdout and stderr as pipes (new
  `sys.std*` objects made the way the interpreter makes them at startup), no other file
  descriptor, the caller's environment (os.environ replaced whole, so C code's getenv sees
  it too), working directory, umask and resource limits, `sys.argv` and `sys.path[0]` of
  the script;
- it runs the script's code as `__main__` and then leaves the way the interpreter leaves a
  script: SystemExit's code, an uncaught exception's traceback and exit 1, an uncaught
  KeyboardInterrupt's death by SIGINT, non-daemon threads joined, atexit handlers run,
  exit 120 when stdout cannot be flushed; the caller sees the wait status as a returncode;
- what a process reads once at startup or import time cannot be handed to a forked child,
  so a call whose environment differs from the server's in any such variable
  (`startup_sensitive`: locale, PYTHON*, loader, OpenSSL, STRONGROOM_NO_SECRETMEM, and
  every variable the import of strongroom.cli read, recorded by the server), or made with
  other ids than the server's, or with a hard resource limit above the server's (a child
  can lower a limit, not raise it), is not eligible: the caller runs a real process.

Fresh-process state the child does share with its siblings: the hash seed of str and
bytes, and the guarded-memory canary of strongroom._native (as every forked child does).
The objects the imports made are frozen (`gc.freeze`): the cycle collector leaves them
alone, which keeps a child from copying the whole heap when it collects at exit.
Randomness is not shared: `random` reseeds after fork, OpenSSL reseeds on fork, and
libsodium and os.urandom read the kernel.

The server dies with the suite: it exits when the other end of its control socket closes,
which happens when pytest exits however it exits.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STARTUP_NAMES = frozenset({"LANG", "LANGUAGE", "TZ", "GLIBC_TUNABLES", "STRONGROOM_NO_SECRETMEM"})
"""Variables a process reads while it starts (locale, time zone, loader) or while strongroom's
native module loads (STRONGROOM_NO_SECRETMEM, read with getenv in C)."""
STARTUP_PREFIXES = ("PYTHON", "LC_", "LD_", "MALLOC_", "OPENSSL_", "SSL_CERT_")
"""The interpreter's own variables, the locale's, the dynamic loader's and malloc's, and
OpenSSL's (read when it initialises). Not the device libraries' (TSS2_*, SOFTHSM2_CONF...):
the server loads none of them (`_check_clean`), so they read the child's environment."""
DEVICE_MODULES = ("strongroom.backends", "tpm2_pytss", "pkcs11", "smartcard", "fido2")
"""What the server must not have imported: the backends and the libraries they load."""

RLIMITS = tuple(
    getattr(resource, name)
    for name in dir(resource)
    if name.startswith("RLIMIT_") and isinstance(getattr(resource, name), int)
)
_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!q")


def _rlimits() -> dict[int, tuple[int, int]]:
    return {r: resource.getrlimit(r) for r in RLIMITS}


def _ids() -> tuple[Any, ...]:
    return (os.getresuid(), os.getresgid(), sorted(os.getgroups()))


def _at_most(a: int, b: int) -> bool:
    """a <= b for resource limits, where RLIM_INFINITY is the largest."""
    inf = resource.RLIM_INFINITY
    return b == inf or (a != inf and a <= b)


def startup_sensitive(name: str, read_at_import: frozenset[str]) -> bool:
    return (
        name in STARTUP_NAMES
        or name in read_at_import
        or any(name.startswith(prefix) for prefix in STARTUP_PREFIXES)
    )


# -- the caller's side (pytest) --------------------------------------------------------------
@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


class ForkServer:
    """One server process; `run()` is thread-safe and may be called from any thread."""

    def __init__(self, script: Path, env: Mapping[str, str]) -> None:
        self.script = script
        self.env = dict(env)
        self._dir = tempfile.mkdtemp(prefix="strongroom-forkserver-")
        self.address = os.path.join(self._dir, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.address)
        listener.listen(64)
        self._control, theirs = socket.socketpair()
        self._log = tempfile.TemporaryFile(prefix="strongroom-forkserver-log-")
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    str(script),
                    str(theirs.fileno()),
                    str(listener.fileno()),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                env=self.env,
                cwd="/",
                pass_fds=(theirs.fileno(), listener.fileno()),
                close_fds=True,
            )
        finally:
            theirs.close()
        self._owner = os.getpid()
        try:
            hello = self._read_hello()
        finally:
            listener.close()
        self.read_at_import: frozenset[str] = frozenset(hello["read_at_import"])
        self.rlimits: dict[int, tuple[int, int]] = hello["rlimits"]
        self.ids: tuple[Any, ...] = hello["ids"]

    def _read_hello(self) -> dict[str, Any]:
        self._control.settimeout(120)
        data = b""
        while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
            chunk = self._control.recv(65536)
            if not chunk:
                raise RuntimeError(f"the CLI fork server did not start:\n{self.log()}")
            data += chunk
        self._control.settimeout(None)
        hello: dict[str, Any] = pickle.loads(data[_HEADER.size :])
        return hello

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def eligible(self, env: Mapping[str, str]) -> bool:
        """Whether a child of the server can stand for a process started with `env` now."""
        return self.refusal(env) is None

    def refusal(self, env: Mapping[str, str]) -> str | None:
        """Why a child of the server cannot stand for a process started with `env` now,
        or None when it can."""
        names = set(env) | set(self.env)
        differ = sorted(
            n
            for n in names
            if startup_sensitive(n, self.read_at_import) and env.get(n) != self.env.get(n)
        )
        if differ:
            return f"read at startup: {', '.join(differ)}"
        if _ids() != self.ids:
            return "other ids"
        # The child sets the caller's limits (pytest may have lowered some: opening a
        # keystore sets RLIMIT_CORE to 0); it can lower a hard limit but not raise one.
        for r, (_, hard) in _rlimits().items():
            if not _at_most(hard, self.rlimits[r][1]):
                return f"a hard resource limit above the server's ({r})"
        return None

    def run(
        self,
        args: Sequence[str],
        *,
        input: bytes,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None,
        timeout: float | None,
    ) -> Completed:
        """Like subprocess.run([script, *args], input=..., capture_output=True, env=env,
        cwd=cwd, timeout=timeout); TimeoutExpired after killing the child, as run() does."""
        umask = os.umask(0o22)
        os.umask(umask)
        request = {
            "args": list(args),
            "env": dict(env),
            "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
            "umask": umask,
            "rlimits": _rlimits(),
        }
        payload = pickle.dumps(request)
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(self.address)
                socket.send_fds(sock, [_HEADER.pack(len(payload))], [stdin_r, out_w, err_w])
                sock.sendall(payload)
            finally:
                for fd in (stdin_r, out_w, err_w):
                    os.close(fd)
            return self._communicate(sock, stdin_w, out_r, err_r, input, args, timeout)
        finally:
            sock.close()
            for fd in (stdin_w, out_r, err_r):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _communicate(
        self,
        sock: socket.socket,
        stdin_w: int,
        out_r: int,
        err_r: int,
        data: bytes,
        args: Sequence[str],
        timeout: float | None,
    ) -> Completed:
        import selectors
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[bytes] = []
        err: list[bytes] = []
        reply = b""
        sel = selectors.DefaultSelector()
        readers = {out_r: out, err_r: err}
        for fd in readers:
            sel.register(fd, selectors.EVENT_READ)
        sel.register(sock, selectors.EVENT_READ)
        view = memoryview(data)
        if data:
            os.set_blocking(stdin_w, False)
            sel.register(stdin_w, selectors.EVENT_WRITE)
        else:
            os.close(stdin_w)
        pid: int | None = None
        status: int | None = None
        try:
            while readers or status is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._kill(pid, sock, reply)
                    raise subprocess.TimeoutExpired([str(self.script), *args], timeout or 0)
                for key, _ in sel.select(remaining):
                    if key.fd == stdin_w:
                        try:
                            view = view[os.write(stdin_w, view[:65536]) :]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # the child did not read it all: as run()
                            view = view[len(view) :]
                        if not view:
                            sel.unregister(stdin_w)
                            os.close(stdin_w)
                    elif key.fd in readers:
                        chunk = os.read(key.fd, 65536)
                        if chunk:
                            readers[key.fd].append(chunk)
                        else:
                            sel.unregister(key.fd)
                            del readers[key.fd]
                    else:
                        chunk = sock.recv(64)
                        if not chunk:
                            sel.unregister(sock)
                            if status is None:
                                raise RuntimeError(f"the CLI fork server failed:\n{self.log()}")
                        reply += chunk
                        if pid is None and len(reply) >= _STATUS.size:
                            pid = _STATUS.unpack_from(reply)[0]
                        if len(reply) >= 2 * _STATUS.size:
                            status = _STATUS.unpack_from(reply, _STATUS.size)[0]
        finally:
            sel.close()
        return Completed(os.waitstatus_to_exitcode(status), b"".join(out), b"".join(err))

    @staticmethod
    def _kill(pid: int | None, sock: socket.socket, reply: bytes) -> None:
        """Kill the child and wait for it, as subprocess.run does on a timeout."""
        sock.settimeout(None)
        while pid is None:
            chunk = sock.recv(64)
            if not chunk:
                return
            reply += chunk
            if len(reply) >= _STATUS.size:
                pid = _STATUS.unpack_from(reply)[0]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while len(reply) < 2 * _STATUS.size:  # its parent in the server reaped it
            chunk = sock.recv(64)
            if not chunk:
                return
            reply += chunk

    def close(self) -> None:
        if os.getpid() != self._owner:  # a forked copy of pytest: the server is not ours
            return
        self._control.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        try:
            os.unlink(self.address)
            os.rmdir(self._dir)
        except OSError:
            pass


# -- the server ------------------------------------------------------------------------------
@dataclass
class _Request:
    args: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    rlimits: dict[int, tuple[int, int]]
    fds: list[int]


def _import_the_cli() -> frozenset[str]:
    """Import what the console script imports; return the names of the environment variables
    read meanwhile through os.environ (their values at startup shape the process)."""
    environ_class = type(os.environ)
    read: set[str] = set()
    getitem = environ_class.__getitem__
    iterate = environ_class.__iter__

    def traced_getitem(self: Any, key: str) -> str:
        read.add(key)
        return getitem(self, key)  # type: ignore[no-any-return]

    def traced_iter(self: Any) -> Any:
        read.add("*")
        return iterate(self)

    environ_class.__getitem__ = traced_getitem  # type: ignore[method-assign]
    environ_class.__iter__ = traced_iter  # type: ignore[method-assign]
    try:
        import strongroom.cli  # noqa: F401  (what the console script imports)
    finally:
        environ_class.__getitem__ = getitem  # type: ignore[method-assign]
        environ_class.__iter__ = iterate  # type: ignore[method-assign]
    if "*" in read:
        raise RuntimeError("importing strongroom.cli read the whole environment")
    return frozenset(read)


def _check_clean() -> None:
    """Refuse to serve from a process a fresh one would not look like: threads, guarded
    memory or a backend (their import may read the environment or open devices)."""
    from strongroom import _native, memory_process

    if threading.active_count() != 1:
        raise RuntimeError(f"threads before fork: {threading.enumerate()}")
    if _native.locked_bytes() or len(memory_process._live):
        raise RuntimeError("guarded memory allocated by the import of strongroom.cli")
    devices = [m for m in sys.modules if m.split(".")[0] in DEVICE_MODULES[1:]]
    devices += [m for m in sys.modules if m.startswith(DEVICE_MODULES[0])]
    if devices:
        raise RuntimeError(f"the import of strongroom.cli imported {devices}")


def _recv_request(conn: socket.socket) -> _Request:
    header, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
    if len(header) != _HEADER.size or len(fds) != 3:
        raise RuntimeError("bad request")
    size = _HEADER.unpack(header)[0]
    payload = b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise RuntimeError("short request")
        payload += chunk
    r = pickle.loads(payload)
    return _Request(r["args"], r["env"], r["cwd"], r["umask"], r["rlimits"], fds)


def _handle(conn: socket.socket) -> _Request:
    """In a child of the server: fork the worker, report its pid and its wait status.
    Returns only in the worker."""
    worker = False
    try:
        request = _recv_request(conn)
        pid = os.fork()
        if pid == 0:
            worker = True
            conn.close()
            return request
        for fd in request.fds:
            os.close(fd)
        conn.sendall(_STATUS.pack(pid))
        _, status = os.waitpid(pid, 0)
        conn.sendall(_STATUS.pack(status))
    except BaseException:
        if not worker:
            import traceback

            traceback.print_exc()
        raise
    finally:
        if not worker:
            os._exit(0)


def _serve(control: socket.socket, listener: socket.socket) -> _Request:
    """Accept calls until the control socket closes. Returns only in a worker."""
    while True:
        if threading.active_count() != 1:
            raise RuntimeError("a thread was started in the fork server")
        ready, _, _ = select.select([control, listener], [], [])
        if control in ready and not control.recv(1):  # pytest is gone
            while True:  # wait for the calls under way, so their time is accounted
                try:
                    os.wait()
                except ChildProcessError:
                    raise SystemExit(0) from None
        if listener in ready:
            conn, _ = listener.accept()
            pid = os.fork()
            if pid == 0:
                control.close()
                listener.close()
                return _handle(conn)
            conn.close()
        while True:  # reap the finished handlers
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def _new_stdio(fd: int, write: bool, like: io.TextIOWrapper) -> io.TextIOWrapper:
    """sys.stdin/stdout/stderr for `fd`, made as the interpreter makes them at startup
    (Python/pylifecycle.c, create_stdio) with the encoding and errors it chose then."""
    # Unbuffered (-u, PYTHONUNBUFFERED) as the server's: its stdout is then a bare FileIO.
    buffered = not isinstance(sys.__stdout__.buffer, io.FileIO)  # type: ignore[union-attr]
    buffering = -1 if buffered or not write else 0
    buffer: Any = open(fd, "wb" if write else "rb", buffering, None, None, None, False)
    raw = buffer.raw if isinstance(buffer, io.BufferedIOBase) else buffer
    raw.name = ("<stdin>", "<stdout>", "<stderr>")[fd]
    line_buffering = buffered and (raw.isatty() or fd == 2)
    stream = io.TextIOWrapper(
        buffer, like.encoding, like.errors, "\n", line_buffering, not buffered
    )
    stream.mode = "w" if write else "r"  # type: ignore[misc]
    return stream


def _become(request: _Request, script: str, keep_fds: set[int]) -> None:
    """Turn this forked worker into a process started as `script ARGS`."""
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep_fds:
            try:
                os.close(fd)
            except OSError:
                pass
    os.chdir(request.cwd)
    os.umask(request.umask)
    for limit, values in request.rlimits.items():
        if resource.getrlimit(limit) != values:
            resource.setrlimit(limit, values)
    os.environ.clear()
    os.environ.update(request.env)
    sys.argv = [script, *request.args]
    sys.orig_argv = [sys.executable, script, *request.args]
    old = (sys.__stdin__, sys.__stdout__, sys.__stderr__)
    new = [_new_stdio(fd, fd > 0, like) for fd, like in enumerate(old)]  # type: ignore[arg-type]
    sys.stdin = sys.__stdin__ = new[0]  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = new[1]  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = new[2]  # type: ignore[misc]


def _without_this_file(tb: Any) -> Any:
    """The traceback from the script's frame on: without the frame of this file that ran it."""
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _silent_hook(*_: object) -> None:
    """Already reported: see the end of this file."""


def _server_main(script: str, control_fd: int, listener_fd: int) -> tuple[_Request, set[int]]:
    """Import, check, say hello, serve. Returns only in a worker: its request and the
    descriptors that the import opened (a fresh process has them too)."""
    control = socket.socket(fileno=control_fd)
    listener = socket.socket(fileno=listener_fd)
    sys.path[0] = os.path.dirname(script)  # as when the kernel runs the script
    before = _open_fds()
    read_at_import = _import_the_cli()
    opened = _open_fds() - before
    _check_clean()
    # Children inherit the imports' objects copy-on-write; the cycle collector, at exit above
    # all, writes to every object it scans and so copies nearly the whole heap: 0.05 s a
    # call. Frozen, the reachable objects of the imports are left out of collections (their
    # garbage is collected first). See docs/decisions.md for why no command can tell.
    gc.collect()
    gc.freeze()
    hello = pickle.dumps(
        {"read_at_import": sorted(read_at_import), "rlimits": _rlimits(), "ids": _ids()}
    )
    control.sendall(_HEADER.pack(len(hello)) + hello)
    return _serve(control, listener), opened


def _open_fds() -> set[int]:
    fds = {int(name) for name in os.listdir("/proc/self/fd")}
    return {fd for fd in fds if _is_open(fd)}  # less the one listdir used


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    _script = sys.argv[1]
    _request, _keep = _server_main(_script, int(sys.argv[2]), int(sys.argv[3]))
    # Only a worker gets here.
    _become(_request, _script, _keep)
    del _request, _keep
    import builtins
    import types

    _main = types.ModuleType("__main__")
    _main.__file__ = _script
    _main.__builtins__ = builtins  # type: ignore[attr-defined]
    _main.__cached__ = None  # type: ignore[attr-defined]
    sys.modules["__main__"] = _main
    with open(_script, "rb") as _f:
        _code = compile(_f.read(), _script, "exec", dont_inherit=True)
    del _f
    try:
        exec(_code, _main.__dict__)
    except SystemExit:
        raise
    except BaseException as _e:
        # The interpreter would report it through sys.excepthook, with a traceback that
        # starts at the script: do that, then let it unwind silently to the interpreter,
        # which exits as for any uncaught exception (1, or by SIGINT for KeyboardInterrupt)
        # after running atexit handlers and flushing the streams.
        _e.with_traceback(_without_this_file(_e.__traceback__))  # what the hook prints
        sys.excepthook(type(_e), _e, _e.__traceback__)
        sys.excepthook = _silent_hook
        raise
