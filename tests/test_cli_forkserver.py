"""The CLI fork server (tests/cli_forkserver.py) gives the same process as the kernel does.

A probe script, run once as a real process and once as a child of a fork server made for
it, reports what a program can see of its process (argv, path, environment, working
directory, umask, standard streams, open descriptors, signal handlers and mask, threads,
resource limits, `__main__`) and leaves in each of the ways a process can end; both runs
must agree byte for byte. Then `run_cli`'s choice between a fork and a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_forkserver import ForkServer
from conftest import (
    FORK_SERVER_ENV,
    STRONGROOM_BIN,
    VAULT_PASS_ENV,
    _command_of,
    fork_server,
    run_cli,
    write_vault_config,
)

PROBE = """\
#!{python}
import sys
from strongroom.cli import main

def report():
    import json, os, signal, threading, resource, __main__
    from strongroom import _native

    def stream(s):
        raw = getattr(s.buffer, "raw", s.buffer)
        return {{
            "type": type(s).__name__, "encoding": s.encoding, "errors": s.errors,
            "line_buffering": s.line_buffering, "write_through": s.write_through,
            "mode": s.mode, "name": s.name, "raw": raw.name,
            "buffer": type(s.buffer).__name__, "seekable": s.seekable(),
            "isatty": s.isatty(), "fileno": s.fileno(), "closefd": raw.closefd,
        }}

    fds = {{}}
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{{name}}").split(":")[0]
        except OSError:
            pass  # the directory listdir read
    return {{
        "argv": sys.argv, "orig_argv": sys.orig_argv, "path": sys.path,
        "flags": str(sys.flags), "executable": sys.executable, "cwd": os.getcwd(),
        "umask": os.umask(0o22), "environ": dict(os.environ),
        "stdio": [stream(s) for s in (sys.stdin, sys.stdout, sys.stderr)],
        "dunder_stdio": [sys.__stdin__ is sys.stdin, sys.__stdout__ is sys.stdout,
                         sys.__stderr__ is sys.stderr],
        "fds": fds,
        "signals": {{s.name: str(signal.getsignal(s)) for s in signal.valid_signals()
                    if isinstance(s, signal.Signals)
                    and s not in (signal.SIGKILL, signal.SIGSTOP)}},
        "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "threads": threading.active_count(),
        "rlimits": {{n: resource.getrlimit(getattr(resource, n)) for n in dir(resource)
                    if n.startswith("RLIMIT_")}},
        "pgrp_is_parents": os.getpgrp() == os.getpgid(int(sys.argv[2])),
        "sid_is_parents": os.getsid(0) == os.getsid(int(sys.argv[2])),
        "main": [__main__.__name__, __main__.__file__, __main__.__package__,
                 __main__.__spec__, __main__.__cached__, __name__],
        "secretmem": _native.secretmem_enabled(), "locked": _native.locked_bytes(),
        "stdin": sys.stdin.read(),
        "excepthook_default": sys.excepthook.__module__,
    }}

if __name__ == "__main__":
    how = sys.argv[1]
    if how == "report":
        import json
        print(json.dumps(report(), sort_keys=True, default=str))
    elif how == "exit-code":
        print("out", end="")
        sys.exit(7)
    elif how == "exit-message":
        sys.exit("a message")
    elif how == "raise":
        def deep():
            raise ValueError("uncaught")
        deep()
    elif how == "interrupt":
        raise KeyboardInterrupt
    elif how == "atexit":
        import atexit
        atexit.register(lambda: print("at exit", flush=True))
    elif how == "thread":
        import threading, time
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread done"))).start()
    elif how == "stdout-closed":
        import os
        os.close(1)
        print("lost")
    elif how == "sleep":
        import time
        time.sleep(600)
    elif how == "signal":
        import os, signal
        os.kill(os.getpid(), signal.SIGTERM)
    elif how == "cli":
        sys.argv[1:] = sys.argv[3:]
        sys.argv[0] = sys.argv[0].removesuffix(".exe")
        sys.exit(main())
"""

WAYS = ["report", "exit-code", "exit-message", "raise", "interrupt", "atexit", "thread"]
WAYS += ["stdout-closed", "signal", "cli"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe"
    path.write_text(PROBE.format(python=sys.executable))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def server(probe: Path) -> Iterator[ForkServer]:
    s = ForkServer(probe, FORK_SERVER_ENV)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("how", WAYS)
def test_a_forked_child_is_the_process_the_kernel_would_start(
    how: str, probe: Path, server: ForkServer, tmp_path: Path
) -> None:
    env = {**FORK_SERVER_ENV, "SOME_VARIABLE": "a value", VAULT_PASS_ENV: "x"}
    env.pop("HOME", None)
    args = [how, str(os.getpid())]
    if how == "cli":
        args += ["--version"]
    data = b"some input\n" * 10000  # more than a pipe holds
    old = os.umask(0o027)
    try:
        real = subprocess.run(
            [str(probe), *args], input=data, env=env, cwd=tmp_path, capture_output=True
        )
        assert server.eligible(env)
        forked = server.run(args, input=data, env=env, cwd=tmp_path, timeout=60)
    finally:
        os.umask(old)
    if how == "report":  # a readable difference first
        got, want = json.loads(forked.stdout), json.loads(real.stdout)
        assert {k: v for k, v in got.items() if want.get(k) != v} == {}
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        real.returncode,
        real.stdout,
        real.stderr,
    )
    if how == "report":
        assert b'"umask": 23' in real.stdout  # 0o027: the caller's, not the server's
        assert b'"SOME_VARIABLE": "a value"' in real.stdout
    if how == "raise":
        assert real.returncode == 1 and b"ValueError: uncaught" in real.stderr
    if how == "interrupt":
        assert real.returncode == -2  # an uncaught KeyboardInterrupt dies of SIGINT


def test_a_timeout_kills_the_child_as_subprocess_run_does(server: ForkServer) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        server.run(["sleep"], input=b"", env=FORK_SERVER_ENV, cwd=None, timeout=0.5)
    # and the server still serves
    done = server.run(["exit-code", "0"], input=b"", env=FORK_SERVER_ENV, cwd=None, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out", b"")


@pytest.mark.parametrize(
    "name", ["LANG", "LC_ALL", "PYTHONIOENCODING", "STRONGROOM_NO_SECRETMEM", "LANGUAGE"]
)
def test_a_variable_read_at_startup_makes_a_real_process(name: str) -> None:
    """Its value at the server's start is the one the server's children have."""
    assert fork_server().eligible(FORK_SERVER_ENV)
    assert not fork_server().eligible({**FORK_SERVER_ENV, name: "C" if name != "LANGUAGE" else "x"})
    assert fork_server().eligible({**FORK_SERVER_ENV, "STRONGROOM_CONFIG": "/nonexistent"})


def test_the_suites_own_environment_is_eligible() -> None:
    """Support modules put variables into pytest's environment when imported (tpm_support:
    TSS2_LOG; pkcs11_support: SOFTHSM2_CONF), after the server's environment was taken: the
    device libraries read them in the child, so they must not send calls to a real process."""
    import tpm_support  # noqa: F401  (sets TSS2_LOG)

    env = {**os.environ, "TSS2_LOG": "all+none", "SOFTHSM2_CONF": "/nonexistent"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", FORK_SERVER_ENV["PYTHONPYCACHEPREFIX"])
    assert fork_server().refusal(env) is None


def test_secretmem_off_is_honoured_through_run_cli(tmp_path: Path) -> None:
    """STRONGROOM_NO_SECRETMEM is read by the native module as it loads, so run_cli gives
    that call a real process, and `doctor` reports memfd_secret off; without it, on."""
    from strongroom import _native

    if not _native.secretmem_available():
        pytest.skip("this kernel has no memfd_secret")
    cfg = write_vault_config(tmp_path)
    off = run_cli(cfg, "doctor", env={"STRONGROOM_NO_SECRETMEM": "1"})
    assert "turned off (STRONGROOM_NO_SECRETMEM)" in off.stdout.decode(), off
    on = run_cli(cfg, "doctor")
    assert "guarded pages leave the kernel's direct map" in on.stdout.decode(), on


def test_the_callers_resource_limits_are_the_childs(probe: Path, server: ForkServer) -> None:
    """Opening a keystore in pytest sets its RLIMIT_CORE to 0 (hard too): a process it starts
    inherits that, and so must a forked child; a hard limit above the server's cannot be
    given to a child, so such a call is not eligible."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = (min(before[0], 200), before[1])  # the soft limit: pytest can raise it back
    args = ["report", str(os.getpid())]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, lower)
        assert server.eligible(FORK_SERVER_ENV)
        forked = server.run(args, input=b"", env=FORK_SERVER_ENV, cwd=None, timeout=60)
        real = subprocess.run(
            [str(probe), *args], input=b"", env=FORK_SERVER_ENV, capture_output=True
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
    got, want = json.loads(forked.stdout), json.loads(real.stdout)
    assert got["rlimits"]["RLIMIT_NOFILE"] == want["rlimits"]["RLIMIT_NOFILE"] == list(lower)
    assert got == want
    # a server whose hard limit is below the caller's cannot give the caller's to a child
    import copy

    low = copy.copy(server)
    low.rlimits = {**server.rlimits, resource.RLIMIT_NOFILE: (100, 100)}
    assert server.eligible(FORK_SERVER_ENV) and not low.eligible(FORK_SERVER_ENV)


def test_the_command_word() -> None:
    assert _command_of(["--config", "serve", "key", "list"]) == "key"
    assert _command_of(["--json", "--server", "unix:/x", "ssh-agent", "-D"]) == "ssh-agent"
    assert _command_of(["--version"]) is None


def test_the_script_is_the_console_script() -> None:
    assert fork_server().script == STRONGROOM_BIN
