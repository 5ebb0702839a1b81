"""`strongroom audit ...`: verify, list and search the audit log; checkpoints and their key."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .. import algorithms
from .. import config as config_mod
from ..errors import InvalidArgument
from ._io import (
    StrongroomSubGroup,
    in_option,
    out_option,
    public_format_option,
    read_input,
    refuse_binary_on_terminal,
    write_output,
)
from ._state import State, pass_state

if TYPE_CHECKING:
    from ..audit import ChainLog

T = TypeVar("T")


@click.group(cls=StrongroomSubGroup)
def audit() -> None:
    """The tamper-evident audit log: verify, list, hash an input, checkpoint."""


_log_option = click.option(
    "--file",
    "file",
    metavar="FILE",
    help="The log (default: audit.jsonl in data_dir, or the chain in [store] url's database).",
)


def _audit_path(state: State, file: str | None) -> Path:
    if file is not None:
        return Path(file)
    return config_mod.load(state.config).data_dir / "audit.jsonl"


def _chain(state: State, file: str | None) -> ChainLog | None:
    """The chain in the shared store (docs/audit.md, "In the database") when the config
    names one and no --file was given; else None (the file)."""
    if file is not None:
        return None
    cfg = config_mod.load(state.config)
    if cfg.store_url is None or cfg.audit != "file":
        return None
    from ..store_chain import open_chain

    return open_chain(cfg.store_url)


def _read_log(
    state: State,
    file: str | None,
    from_chain: Callable[[ChainLog], T],
    from_file: Callable[[Path], T],
) -> T:
    """Read the log where it is: the shared store's chain (closed afterwards) when
    `_chain` finds one, else the file."""
    chain = _chain(state, file)
    if chain is None:
        return from_file(_audit_path(state, file))
    try:
        return from_chain(chain)
    finally:
        chain.close()


def _load_public(path: str) -> PublicKeyTypes:
    from cryptography.hazmat.primitives import serialization

    data = read_input(path)
    try:
        if b"-----BEGIN" in data:
            return serialization.load_pem_public_key(data)
        return serialization.load_der_public_key(data)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{path} is not a PEM or DER public key") from None


def _anchor(text: str | None) -> tuple[int, str] | None:
    if text is None:
        return None
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise InvalidArgument("--anchor is SEQ:HASH (a record number and its 64-hex-digit hash)")
    return int(seq), digest


@audit.command("verify")
@_log_option
@click.option(
    "--public-key",
    "public",
    metavar="FILE",
    help="Checkpoint key (PEM or DER), e.g. from `audit public-key`; default: the keystore's.",
)
@click.option(
    "--anchor", metavar="SEQ:HASH", help="A record noted earlier that must still be there."
)
@pass_state
def audit_verify(state: State, file: str | None, public: str | None, anchor: str | None) -> None:
    """Check the hash chain and checkpoint signatures; exit 9 naming the first bad record."""
    from ..audit import verify_chain, verify_log

    expected = _anchor(anchor)
    key = _load_public(public) if public else state.local("audit verify").audit_public_key()
    report = _read_log(
        state,
        file,
        lambda chain: verify_chain(chain, key, expected),
        lambda path: verify_log(path, key, expected),
    )
    for warning in report.warnings:
        if not state.json:
            click.echo(f"strongroom: warning: {warning}", err=True)
    if not report.ok:
        state.emit(report.to_dict())
        report.raise_if_tampered()

    def text() -> str:
        signed = (
            f"{report.checkpoints} checkpoint(s), {report.checkpoints_verified} verified"
            if key is not None
            else f"{report.checkpoints} checkpoint(s), signatures not checked (no key yet)"
        )
        return (
            f"audit log OK: {report.records} records"
            + (f" (seq {report.first_seq}-{report.last_seq})" if report.records else "")
            + f", {signed}; last record {report.last_seq}:{report.last_hash}"
        )

    state.emit(report.to_dict(), text)


@audit.command("list")
@_log_option
@click.option("--since", "since", type=click.IntRange(0), default=0, help="Only records after seq.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@pass_state
def audit_list(state: State, file: str | None, since: int, limit: int) -> None:
    """Print records (JSON lines), oldest first; this does not verify them."""
    from ..audit import chain_records, read_records

    records = _read_log(
        state,
        file,
        lambda chain: chain_records(chain, since, limit),
        lambda path: read_records(path, since, limit),
    )
    state.emit(records, lambda: "\n".join(json.dumps(r, sort_keys=True) for r in records))


@audit.command("hash")
@in_option("The input to look for (default: stdin).")
@click.option("--file", "file", metavar="FILE", help="The log whose HMAC key to use.")
@pass_state
def audit_hash(state: State, inp: str | None, file: str | None) -> None:
    """The HMAC of an input as this log records it (`input` field), to find it in the log."""
    from ..audit.log import input_hmac, key_path_for, load_key

    mac = input_hmac(
        load_key(key_path_for(_audit_path(state, file)), create=False), read_input(inp)
    )
    state.emit({"input": mac}, mac)


@audit.command("checkpoint")
@pass_state
def audit_checkpoint(state: State) -> None:
    """Append a checkpoint signed by the audit key now (made on first use)."""
    done = state.local("audit checkpoint").audit_checkpoint()
    if done is None:
        raise InvalidArgument('checkpoints need audit = "file" in the config')
    state.emit(done, f"checkpoint seq {done['seq']} signs records 1-{done['covers']}")


@audit.command("public-key")
@public_format_option
@out_option("Write here instead of stdout.")
@pass_state
def audit_public_key(state: State, fmt: str, out: str | None) -> None:
    """The checkpoint signing key's public key, to keep apart from the log for verify."""
    if fmt in ("der", "raw"):
        refuse_binary_on_terminal(out, f"a {fmt} public key")
    public = state.local("audit public-key").audit_public_key()
    if public is None:
        raise InvalidArgument("no audit checkpoint key yet; run `strongroom audit checkpoint`")
    data = algorithms.encode_public(public, fmt)
    write_output(out, data + (b"\n" if fmt == "openssh" else b""))
