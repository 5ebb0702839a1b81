"""`strongroom key ...`: make, name, show, move and retire keys (the `key` group).

The commands that pass data through a key (sign, verify, encrypt, decrypt, rewrap) are in
keyops.py, on the same group.
"""

from __future__ import annotations

import json
import sys

import click

from .. import algorithms
from ..types import KeyType
from ._io import (
    FC,
    KEY_HEADERS,
    MAX_KEY_INPUT,
    StrongroomSubGroup,
    exportable_option,
    in_option,
    key_rows,
    out_option,
    parse_hex,
    public_format_option,
    read_input,
    read_secret_into,
    refuse_binary_on_terminal,
    secret_source,
    table,
    usage_option,
    write_output,
)
from ._state import State, pass_state


@click.group(cls=StrongroomSubGroup)
def key() -> None:
    """Generate, use and manage keys."""


TYPE_CHOICE = click.Choice(
    [t.value for t in KeyType if t not in (KeyType.SEED, KeyType.SECRET)], case_sensitive=False
)


def _hkdf_options(f: FC) -> FC:
    """`--type`, `--salt` and `--info` of a key made with HKDF (`derive`, `agree`)."""
    f = click.option("--info", "info", default="", help="HKDF info (context), text.")(f)
    f = click.option("--salt", default="", help="HKDF salt, hex.")(f)
    return click.option(
        "--type", "key_type", default="aes-256", show_default=True, type=TYPE_CHOICE
    )(f)


_bip39_passphrase_option = click.option(
    "--passphrase",
    "bip39_pass",
    default=None,
    help="BIP39 passphrase as env:NAME, file:PATH or prompt (default: none).",
)


@key.command("generate")
@click.argument("name")
@click.option("--type", "key_type", required=True, type=TYPE_CHOICE, help="Key type.")
@click.option("--backend", help="Backend to create it in (default: first in order that can).")
@usage_option("Comma-separated usages (default depends on the type).")
@exportable_option("Allow the key to be exported or wrapped.")
@pass_state
def key_generate(
    state: State, name: str, key_type: str, backend: str | None, usage: str | None, exportable: bool
) -> None:
    """Create a key."""
    info = state.keystore().generate(
        name, key_type, backend=backend, usage=usage, exportable=exportable
    )
    state.emit(info.to_dict(), f"generated {info.type.value} key {info.name!r} in {info.backend}")


@key.command("list")
@pass_state
def key_list(state: State) -> None:
    """List keys."""
    keys = state.keystore().keys()
    state.emit([k.to_dict() for k in keys], lambda: table(key_rows(keys), KEY_HEADERS))


@key.command("show")
@click.argument("name")
@pass_state
def key_show(state: State, name: str) -> None:
    """Show a key's metadata and public key."""
    ks = state.keystore()
    info = ks.info(name)
    data = info.to_dict()
    if info.type.is_asymmetric and info.type is not KeyType.SEED:
        data["public_key"] = algorithms.encode_public(ks.public_key(name), "pem").decode()
    if info.type.is_fido:
        data["signatures"] = (
            "FIDO assertions: CBOR of authenticator data, client data JSON and a signature over "
            "authenticatorData + SHA-256(clientDataJSON), not a raw signature over the data "
            "(see docs/fido.md)"
        )

    def text() -> str:
        lines = [
            f"{k}: {v if not isinstance(v, list) else ', '.join(v)}"
            for k, v in data.items()
            if k not in ("public_key", "attributes")
        ]
        if "public_key" in data:
            lines.append(str(data["public_key"]).rstrip())
        return "\n".join(lines)

    state.emit(data, text)


@key.command("public")
@click.argument("name")
@public_format_option
@out_option("Write here instead of stdout.")
@click.option(
    "--version",
    "version",
    type=click.IntRange(1),
    help="The public key of this key version (default: the newest).",
)
@pass_state
def key_public(state: State, name: str, fmt: str, out: str | None, version: int | None) -> None:
    """Print a key's public key."""
    if fmt in ("der", "raw"):
        refuse_binary_on_terminal(out, f"a {fmt} public key")
    ks = state.keystore()
    if fmt == "openssh":  # FIDO keys of an ssh: application as ssh-agent offers them (sk-)
        from ..sshagent import keys as sshagent_keys  # only here: not on every start

        data = sshagent_keys.openssh_public_line(ks, name, version) + b"\n"
    else:
        data = algorithms.encode_public(ks.public_key(name, version), fmt)
    write_output(out, data)


@key.command("import")
@click.argument("name")
@click.option(
    "--type",
    "key_type",
    required=True,
    type=click.Choice([t.value for t in KeyType], case_sensitive=False),
)
@in_option("Key material (default: stdin).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "raw", "der", "pem"]),
    default="auto",
    show_default=True,
)
@click.option("--backend", help="Backend to import into.")
@usage_option("Comma-separated usages.")
@exportable_option()
@pass_state
def key_import(
    state: State,
    name: str,
    key_type: str,
    inp: str | None,
    fmt: str,
    backend: str | None,
    usage: str | None,
    exportable: bool,
) -> None:
    """Import key material (PEM, DER or raw)."""
    from ..memory import wipe as wipe_buffer  # needs the native extension; doctor must not

    material = bytearray(MAX_KEY_INPUT + 1)
    try:
        size = read_secret_into(inp, material)
        with memoryview(material) as whole, whole[:size] as view:
            info = state.keystore().import_key(
                name,
                key_type,
                view,
                backend=backend,
                usage=usage,
                exportable=exportable,
                format=fmt,
            )
    finally:
        wipe_buffer(material)
    state.emit(info.to_dict(), f"imported {info.type.value} key {info.name!r} into {info.backend}")


@key.command("export")
@click.argument("name")
@click.option(
    "--format", "fmt", type=click.Choice(["pem", "der", "raw"]), default="pem", show_default=True
)
@out_option("Write here (mode 600) instead of stdout.")
@pass_state
def key_export(state: State, name: str, fmt: str, out: str | None) -> None:
    """Export an exportable key's private material."""
    if fmt != "pem":
        refuse_binary_on_terminal(out, f"a {fmt} private key")
    write_output(out, state.keystore().export_key(name, fmt))


@key.command("adopt")
@click.argument("name")
@click.option("--backend", required=True, help="The backend that holds the key.")
@click.option("--label", help="Find the key by its label (PKCS#11 CKA_LABEL).")
@click.option("--id", "key_id", metavar="HEX", help="Find the key by its id (PKCS#11 CKA_ID).")
@click.option("--type", "key_type", type=TYPE_CHOICE, help="Expected key type (checked).")
@usage_option("Comma-separated usages (default: what the key allows).")
@pass_state
def key_adopt(
    state: State,
    name: str,
    backend: str,
    label: str | None,
    key_id: str | None,
    key_type: str | None,
    usage: str | None,
) -> None:
    """Register a key that already exists in a backend, without copying it."""
    if label is None and key_id is None:
        raise click.UsageError("give --label, --id or both")
    ref = {k: v for k, v in (("label", label), ("id", key_id)) if v is not None}
    info = state.keystore().adopt(name, backend, ref, key_type, usage)
    state.emit(info.to_dict(), f"adopted {info.type.value} key {info.name!r} in {info.backend}")


@key.command("attest")
@click.argument("name")
@click.option("--nonce", metavar="HEX", help="The relying party's nonce (default: random).")
@out_option("Write the statement here (default: stdout).")
@pass_state
def key_attest(state: State, name: str, nonce: str | None, out: str | None) -> None:
    """Prove that a key lives in its hardware: a JSON statement for `attest verify`."""
    statement = state.keystore().attest(name, None if nonce is None else parse_hex(nonce, "nonce"))
    write_output(out, (json.dumps(statement, indent=2, sort_keys=True) + "\n").encode())


@key.command("delete")
@click.argument("name")
@click.option("--now", "at_once", is_flag=True, help="Destroy the key at once, with no wait.")
@click.option(
    "--after",
    metavar="WAIT",
    help="Waiting period before destruction, e.g. 30d or 12h (default: keystore.deletion_wait).",
)
@click.option("--cancel", is_flag=True, help="Cancel a scheduled deletion.")
@pass_state
def key_delete(state: State, name: str, at_once: bool, after: str | None, cancel: bool) -> None:
    """Delete a key: after the waiting period (keystore.deletion_wait, default none), or --now.

    A scheduled key does no work; `key delete --cancel NAME` brings it back until it is due.
    """
    from ..lifecycle import parse_duration

    if sum((at_once, after is not None, cancel)) > 1:
        raise click.UsageError("give only one of --now, --after and --cancel")
    ks = state.keystore()
    if cancel:
        info = ks.cancel_deletion(name)
        state.emit(info.to_dict(), f"deletion of {name!r} cancelled")
        return
    if at_once:
        ks.delete(name)
        state.emit({"deleted": name}, f"deleted {name!r}")
        return
    scheduled = ks.schedule_deletion(name, None if after is None else parse_duration(after))
    if scheduled is None or scheduled.delete_after is None:
        state.emit({"deleted": name}, f"deleted {name!r}")
        return
    when = scheduled.delete_after.isoformat()
    state.emit(
        {"scheduled": name, "delete_after": when},
        f"key {name!r} will be deleted at {when}; cancel with `key delete --cancel {name}`",
    )


@key.command("purge")
@pass_state
def key_purge(state: State) -> None:
    """Carry out every scheduled deletion that is due (run it from cron or a timer)."""
    done = state.local("key purge").purge_due()
    state.emit(
        {"deleted": [i.name for i in done]},
        "\n".join(f"deleted {i.name!r}" for i in done) or "no deletion is due",
    )


@key.command("rotate")
@click.argument("name")
@click.option("--backend", help="Backend for the new version (default: the current version's).")
@pass_state
def key_rotate(state: State, name: str, backend: str | None) -> None:
    """Make a new version of a key; it becomes primary, older ones still decrypt and verify."""
    info = state.keystore().rotate(name, backend)
    state.emit(
        info.to_dict(), f"rotated {name!r}: version {info.version} in {info.backend} is primary"
    )


@key.command("versions")
@click.argument("name")
@pass_state
def key_versions(state: State, name: str) -> None:
    """List a key's versions (the last is primary) and which still decrypt."""
    ks = state.keystore()
    info = ks.info(name)
    rows = [
        {
            "version": v.version,
            "backend": v.backend,
            "created": v.created.isoformat(),
            "primary": v.version == info.version,
            "decrypts": v.version >= info.min_decryption_version,
        }
        for v in ks.versions(name)
    ]
    state.emit(
        rows,
        lambda: table(
            [
                [
                    str(r["version"]),
                    str(r["backend"]),
                    str(r["created"]),
                    "primary" if r["primary"] else ("active" if r["decrypts"] else "retired"),
                ]
                for r in rows
            ],
            ["VERSION", "BACKEND", "CREATED", "STATE"],
        ),
    )


@key.command("config")
@click.argument("name")
@click.option(
    "--min-decryption-version",
    "min_dec",
    type=click.IntRange(1),
    required=True,
    help="Versions below this no longer decrypt or verify.",
)
@pass_state
def key_config(state: State, name: str, min_dec: int) -> None:
    """Change a key's settings: min_decryption_version (as in Vault's transit)."""
    info = state.keystore().set_min_decryption_version(name, min_dec)
    state.emit(info.to_dict(), f"key {name!r}: min_decryption_version {min_dec}")


@key.command("trim")
@click.argument("name")
@pass_state
def key_trim(state: State, name: str) -> None:
    """Destroy the versions below min_decryption_version for good."""
    gone = state.local("key trim").trim(name)
    state.emit(
        {"trimmed": gone},
        f"destroyed versions {', '.join(map(str, gone))} of {name!r}"
        if gone
        else "no version to trim",
    )


@key.command("disable")
@click.argument("name")
@pass_state
def key_disable(state: State, name: str) -> None:
    """Refuse every use of a key until `key enable`."""
    info = state.keystore().disable(name)
    state.emit(info.to_dict(), f"key {name!r} disabled")


@key.command("enable")
@click.argument("name")
@pass_state
def key_enable(state: State, name: str) -> None:
    """Allow a disabled key again."""
    info = state.keystore().enable(name)
    state.emit(info.to_dict(), f"key {name!r} enabled")


@key.command("derive")
@click.argument("name")
@click.argument("new_name")
@_hkdf_options
@usage_option("Usages of the new key.")
@exportable_option()
@pass_state
def key_derive(
    state: State,
    name: str,
    new_name: str,
    key_type: str,
    salt: str,
    info: str,
    usage: str | None,
    exportable: bool,
) -> None:
    """HKDF-SHA256 from a key into a new key; the secret stays in the backend."""
    new = state.keystore().derive(
        name, new_name, key_type, usage, parse_hex(salt), info.encode(), exportable
    )
    state.emit(new.to_dict(), f"derived {new.type.value} key {new.name!r}")


@key.command("agree")
@click.argument("name")
@click.argument("new_name")
@click.option("--peer", metavar="FILE", required=True, help="Peer public key (PEM, DER or raw).")
@_hkdf_options
@usage_option("Usages of the new key.")
@pass_state
def key_agree(
    state: State,
    name: str,
    new_name: str,
    peer: str,
    key_type: str,
    salt: str,
    info: str,
    usage: str | None,
) -> None:
    """ECDH or X25519 with a peer, HKDF into a new key."""
    new = state.keystore().agree(
        name, read_input(peer), new_name, key_type, usage, parse_hex(salt), info.encode()
    )
    state.emit(new.to_dict(), f"agreed {new.type.value} key {new.name!r}")


@key.command("wrap")
@click.argument("wrapping_key")
@click.argument("name")
@out_option()
@pass_state
def key_wrap(state: State, wrapping_key: str, name: str, out: str | None) -> None:
    """Wrap an exportable key under an AES key (RFC 5649)."""
    refuse_binary_on_terminal(out, "a wrapped key")
    write_output(out, state.keystore().wrap(wrapping_key, name))


@key.command("unwrap")
@click.argument("wrapping_key")
@click.argument("new_name")
@click.option("--type", "key_type", required=True, type=TYPE_CHOICE)
@in_option()
@usage_option()
@exportable_option()
@pass_state
def key_unwrap(
    state: State,
    wrapping_key: str,
    new_name: str,
    key_type: str,
    inp: str | None,
    usage: str | None,
    exportable: bool,
) -> None:
    """Unwrap a wrapped key into a new key."""
    new = state.keystore().unwrap(
        wrapping_key, read_input(inp), new_name, key_type, usage, exportable
    )
    state.emit(new.to_dict(), f"unwrapped {new.type.value} key {new.name!r}")


@key.command("bip39-generate")
@click.argument("name")
@click.option("--words", type=click.Choice(["12", "15", "18", "21", "24"]), default="24")
@_bip39_passphrase_option
@pass_state
def key_bip39_generate(state: State, name: str, words: str, bip39_pass: str | None) -> None:
    """Make a BIP39 seed inside the vault; print its mnemonic once, for the paper backup."""
    info, mnemonic = state.local("key bip39-generate").bip39_generate(
        name, int(words), _passphrase(bip39_pass)
    )
    state.emit({"key": info.to_dict(), "mnemonic": mnemonic}, mnemonic)


@key.command("bip39-recover")
@click.argument("name")
@_bip39_passphrase_option
@pass_state
def key_bip39_recover(state: State, name: str, bip39_pass: str | None) -> None:
    """Store the seed of a mnemonic read from stdin."""
    mnemonic = sys.stdin.readline().strip()
    info = state.local("key bip39-recover").bip39_recover(name, mnemonic, _passphrase(bip39_pass))
    state.emit(info.to_dict(), f"recovered seed {info.name!r}")


@key.command("slip10-derive")
@click.argument("seed")
@click.argument("path")
@click.argument("new_name")
@click.option(
    "--type",
    "key_type",
    type=click.Choice(["ed25519", "secp256k1"], case_sensitive=False),
    default="ed25519",
)
@usage_option()
@pass_state
def key_slip10(
    state: State, seed: str, path: str, new_name: str, key_type: str, usage: str | None
) -> None:
    """Derive a key at a SLIP-0010 path (e.g. m/44'/0'/0') from a seed key."""
    new = state.local("key slip10-derive").slip10_derive(seed, path, new_name, key_type, usage)
    state.emit(new.to_dict(), f"derived {new.type.value} key {new.name!r} at {path}")


def _passphrase(ref: str | None) -> str:
    return "" if ref is None else secret_source(ref, "BIP39 passphrase: ").get()
