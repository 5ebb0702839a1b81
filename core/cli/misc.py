"""The top-level commands (`init`, `backends`, `doctor`, `random`, the envelope `encrypt` and
`decrypt`) and `attest verify`."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import stat
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO, cast

import click
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .. import algorithms, strictjson
from .. import config as config_mod
from ..errors import AttestationInvalid, InvalidArgument, StrongroomError
from ..keystore import Keystore
from ..keystore_repair import Orphan
from ._io import (
    EXIT_OTHER,
    StrongroomCommand,
    StrongroomSubGroup,
    TerminalText,
    allow_weak_option,
    in_option,
    open_in,
    open_out,
    out_option,
    parse_hex,
    read_input,
    refuse_binary_on_terminal,
    table,
    write_output,
)
from ._state import State, pass_state


@click.command(cls=StrongroomCommand)
@allow_weak_option
@pass_state
def init(state: State) -> None:
    """Create the software vault (asks for a new passphrase)."""
    vault = state.local("init").vault_control()
    vault.initialize()
    status = vault.vault_status()
    state.emit(status, f"created vault in {status['store']}")


@click.command(cls=StrongroomCommand)
@pass_state
def backends(state: State) -> None:
    """List configured backends: status, reason and capabilities."""
    statuses = state.keystore().backends()
    data = [s.to_dict() for s in statuses]

    def text() -> str:
        rows = []
        for s in statuses:
            types = sorted({t.value for t, _ in s.capabilities})
            rows.append(
                [
                    s.name,
                    s.type,
                    "available" if s.available else "unavailable",
                    ", ".join(types) if s.available else (s.reason or ""),
                ]
            )
        return table(rows, ["NAME", "TYPE", "STATUS", "KEY TYPES / REASON"])

    state.emit(data, text)


def _core_limit(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def _dumpable() -> bool | None:
    """prctl(PR_GET_DUMPABLE), or None where it cannot be asked (not Linux)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        value = int(libc.prctl(3, 0, 0, 0, 0))  # 3: PR_GET_DUMPABLE
    except (OSError, AttributeError):
        return None
    return None if value < 0 else value != 0


@click.command(cls=StrongroomCommand)
@click.option(
    "--repair",
    is_flag=True,
    help="Remove keys a crash left in a device without a catalog entry, asking for each.",
)
@click.option("--yes", is_flag=True, help="With --repair: remove them without asking.")
@pass_state
def doctor(state: State, repair: bool, yes: bool) -> None:
    """Check the native extension, the mlock limit, memfd_secret, the config, core dumps,
    every backend, and device keys that no catalog entry names."""
    if yes and not repair:
        raise click.UsageError("--yes goes with --repair")
    # Opening the keystore turns core dumps off: note what the process started with first.
    core_at_start = resource.getrlimit(resource.RLIMIT_CORE)[0]
    dumpable_at_start = _dumpable()
    checks: list[dict[str, str]] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        checks.append(
            {
                "check": name,
                "status": {True: "ok", False: "problem", None: "note"}[ok],
                "detail": detail,
            }
        )

    try:
        from ..memory import memlock_status  # needs the native extension
    except ImportError as e:
        check("native extension", False, f"not built ({e}); run pip install -e .")
    else:
        check("native extension", True, "strongroom._native is built")
        mem = memlock_status()
        limit = "unlimited" if mem.soft_limit is None else f"{mem.soft_limit // 1024} KiB"
        check(
            "mlock limit",
            mem.mlock_failures == 0,
            f"RLIMIT_MEMLOCK {limit}, {mem.locked_bytes} bytes locked, "
            f"{mem.mlock_failures} mlock failures",
        )
        if mem.secretmem_enabled and mem.secretmem_available:
            check("memfd_secret", True, "guarded pages leave the kernel's direct map")
        else:
            check(
                "memfd_secret",
                None,
                "not available on this kernel"
                if not mem.secretmem_available
                else "turned off (STRONGROOM_NO_SECRETMEM)",
            )
    try:
        cfg = config_mod.load(state.config)
        check("config", True, cfg.path or "embedded default")
        ks = state.keystore()  # opening the keystore applies the core-dump setting
        core_now = resource.getrlimit(resource.RLIMIT_CORE)[0]
        dumpable_now = _dumpable()
        started = (
            f"started with RLIMIT_CORE {_core_limit(core_at_start)}"
            + ({True: ", dumpable", False: ", not dumpable", None: ""}[dumpable_at_start])
        )
        if not isinstance(ks, Keystore):
            check("core dumps", None, f"{started}; keys are used in the service, not here")
        elif cfg.core_dumps:
            check("core dumps", None, f"{started}; left so: core_dumps = true in the config")
        else:
            off = core_now == 0 and dumpable_now is not True
            now = (
                f"RLIMIT_CORE {_core_limit(core_now)}"
                + ({True: ", dumpable", False: ", not dumpable", None: ""}[dumpable_now])
            )
            check(
                "core dumps",
                off,
                f"{started}; Strongroom set {now}"
                if off
                else f"{started}; Strongroom could not turn them off: {now}",
            )
        for s in ks.backends():
            check(f"backend {s.name}", s.available, s.reason or f"{s.type}: available")
            for note in s.details.get("notes") or []:  # what works, but with a caveat
                check(f"backend {s.name}", None, str(note))
        if isinstance(ks, Keystore):
            _orphan_checks(ks, check, repair, yes)
        elif repair:
            raise click.UsageError("--repair works on the keystore in process, not --server")
    except StrongroomError as e:
        check("config", False, str(e))
    problems = [c for c in checks if c["status"] == "problem"]
    state.emit(
        checks,
        lambda: table(
            [[c["check"], c["status"], c["detail"]] for c in checks], ["CHECK", "STATUS", "DETAIL"]
        ),
    )
    if problems:
        sys.exit(EXIT_OTHER)


def _orphan_checks(
    ks: Keystore, check: Callable[[str, bool | None, str], None], repair: bool, yes: bool
) -> None:
    """Device keys a crash left without a catalog entry (docs/storage.md): each one is a
    problem; with --repair, each confirmed one is destroyed."""
    orphans, unsearched = ks.orphans()
    for reason in unsearched:
        check("orphan keys", None, f"not searched: {reason}")
    if repair and orphans:

        def confirm(orphan: Orphan) -> bool:
            return yes or click.confirm(
                f"remove {orphan.description} ({orphan.handle}) from backend "
                f"{orphan.backend!r}? No catalog entry names it",
                default=False,
                err=True,
            )

        removed = {(o.backend, o.handle) for o in ks.repair_orphans(confirm)}
        for o in orphans:
            if (o.backend, o.handle) in removed:
                check("orphan key", True, f"removed {o.description} ({o.handle}) from {o.backend}")
        orphans = [o for o in orphans if (o.backend, o.handle) not in removed]
    for o in orphans:
        check(
            "orphan key",
            False,
            f"{o.backend}: {o.description} ({o.handle}) has no catalog entry (left by a crash "
            "between making it and recording it); `strongroom doctor --repair` removes it",
        )


@click.command("random", cls=StrongroomCommand)
@click.argument("n", type=click.IntRange(1, 1 << 20))
@click.option("--backend", help="Backend whose generator to use (default: the vault).")
@click.option("--hex", "as_hex", is_flag=True, help="Print hex instead of raw bytes.")
@out_option("Write the raw bytes here (- for stdout; default stdout).")
@pass_state
def random_cmd(state: State, n: int, backend: str | None, as_hex: bool, out: str | None) -> None:
    """Print N random bytes."""
    raw = not state.json and not as_hex
    if raw:
        refuse_binary_on_terminal(out, "random bytes")
    data = state.keystore().random(n, backend)
    if raw:
        write_output(out, data)
    elif state.json:
        state.emit({"hex": data.hex()})
    else:
        click.echo(data.hex())


PROGRESS_MIN = 8 * 1024 * 1024
"""Inputs at least this large get a progress bar (when stderr is a terminal)."""


@contextlib.contextmanager
def _progress(src: BinaryIO, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for a large regular file, only when stderr is a terminal."""
    size = 0
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        st = os.fstat(src.fileno())
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
    if size < PROGRESS_MIN or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=size, label=label, file=sys.stderr) as bar:
        yield bar.update


@click.command("encrypt", cls=StrongroomCommand)
@click.option("--key", "name", required=True, help="The key that wraps the data key (the KEK).")
@in_option("Data to encrypt (default: stdin).")
@out_option("Where the envelope goes (default: stdout).")
@click.option(
    "--algorithm",
    type=click.Choice(algorithms.KEK_ALGORITHMS),
    help=algorithms.KEK_ALGORITHMS_HELP,
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1024, 16 * 1024 * 1024),
    default=65536,
    show_default=True,
    help="Plaintext bytes per authenticated chunk.",
)
@pass_state
def encrypt_cmd(
    state: State,
    name: str,
    inp: str | None,
    out: str | None,
    algorithm: str | None,
    chunk_size: int,
) -> None:
    """Envelope-encrypt a file or stream of any size: a fresh data key wrapped by --key, the
    data in authenticated AES-256-GCM chunks (docs/envelope.md)."""
    refuse_binary_on_terminal(out, "an envelope")
    ks = state.local("encrypt")
    with open_in(inp) as src, open_out(out) as dst, _progress(src, "encrypting") as bar:
        header = ks.encrypt_stream(
            name, src, dst.stream, algorithm=algorithm, chunk_size=chunk_size, progress=bar
        )
        dst.commit()
    if state.json and out not in (None, "-"):
        state.emit(header)


@click.command("decrypt", cls=StrongroomCommand)
@in_option("The envelope (default: stdin).")
@out_option("Where the plaintext goes (default: stdout).")
@pass_state
def decrypt_cmd(state: State, inp: str | None, out: str | None) -> None:
    """Decrypt an envelope from `strongroom encrypt`; its header names the key and version.

    With --out FILE, the file appears only if every chunk authenticates. On stdout, or to a
    device or FIFO, chunks are written as they authenticate, and a failure exits non-zero
    after them."""
    ks = state.local("decrypt")
    with open_in(inp) as src, open_out(out) as dst, _progress(src, "decrypting") as bar:
        sink = dst.stream
        if out is None and sys.stdout.isatty():
            sink = cast(BinaryIO, TerminalText(sink))
        header = ks.decrypt_stream(src, sink, progress=bar)
        dst.commit()
    if state.json and out not in (None, "-"):
        state.emit(header)


@click.group(cls=StrongroomSubGroup)
def attest() -> None:
    """Check key attestation statements (made by `key attest`); needs no config or device."""


@attest.command("verify")
@in_option("The statement (default: stdin).")
@click.option("--nonce", metavar="HEX", help="The nonce you asked for; checked when given.")
@click.option("--ak", metavar="FILE", help="PEM public key of the attestation key you trust.")
@click.option("--public", metavar="FILE", help="PEM public key the attested key must have.")
@pass_state
def attest_verify(
    state: State, inp: str | None, nonce: str | None, ak: str | None, public: str | None
) -> None:
    """Verify a statement: exit 0 if it proves what it claims, 1 if not."""
    from ..keystore import verify_attestation

    try:
        statement = strictjson.loads(read_input(inp))
    except ValueError:
        raise AttestationInvalid("the statement is not JSON") from None
    facts = verify_attestation(
        statement,
        None if nonce is None else parse_hex(nonce, "nonce"),
        None if ak is None else _pem_public(ak),
        None if public is None else _pem_public(public),
    )

    def text() -> str:
        lines = [
            f"attestation valid: key {facts.get('key')!r} ({facts.get('key_type')}) "
            "cannot leave the TPM that certified it",
            f"attestation key: {facts.get('attestation_key')}"
            + ("" if facts.get("attestation_key_trusted") else " (NOT checked: give --ak)"),
            "nonce: " + ("matches" if facts.get("nonce_checked") else "NOT checked: give --nonce"),
        ]
        return "\n".join(lines)

    state.emit(facts, text)


def _pem_public(path: str) -> PublicKeyTypes:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(read_input(path))
    except (ValueError, TypeError):
        raise InvalidArgument(f"{path} is not a PEM public key") from None
