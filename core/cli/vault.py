"""`strongroom vault ...`: the software vault's status, lock, key slots, recovery, backup."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

import click

from ..backend import VaultControl
from ..errors import InvalidArgument
from ..keystore import vault_restore
from ._io import (
    StrongroomSubGroup,
    allow_weak_option,
    new_passphrase,
    read_input,
    secret_source,
    write_output,
)
from ._state import State, pass_state


@click.group(cls=StrongroomSubGroup)
def vault() -> None:
    """The software vault: status, lock, unlock, key slots, backup and restore."""


class VaultAdmin(Protocol):
    """The vault commands the service offers too (to its admin): status, unlock and lock."""

    def vault_status(self) -> dict[str, Any]: ...

    def unlock(self, method: str | None = None) -> str: ...

    def lock(self) -> None: ...


def _vault_admin(state: State) -> VaultAdmin:
    """The vault here, or with a service configured, the service's (admin only)."""
    if state.remote():
        return state.service().vault_control()
    return state.local("vault").vault_control()


def _vault(state: State, command: str) -> VaultControl:
    """The vault's own commands: in process only (`State.local` refuses them otherwise)."""
    return state.local(command).vault_control()


@vault.command("status")
@pass_state
def vault_status(state: State) -> None:
    """Show where the vault is and whether it opens (does not unlock it)."""
    status = _vault_admin(state).vault_status()
    state.emit(status, lambda: "\n".join(f"{k}: {v}" for k, v in status.items()))


@vault.command("unlock")
@click.option("--method", help="Unlock method to use (default: the configured ones, in order).")
@pass_state
def vault_unlock(state: State, method: str | None) -> None:
    """Check that the vault opens. A CLI process holds it open only while it runs."""
    vault = _vault_admin(state)
    used = vault.unlock(method)
    status = vault.vault_status()
    state.emit(status, f"vault unlocked with {used}: {status['keys']} keys")


@vault.command("lock")
@pass_state
def vault_lock(state: State) -> None:
    """Wipe the vault's keys from this process (each CLI run locks it when it ends)."""
    _vault_admin(state).lock()
    state.emit({"unlocked": False}, "vault locked")


@vault.command("enroll")
@click.argument("methods", nargs=-1, metavar="METHOD [METHOD ...]")
@click.option(
    "--threshold",
    "threshold_k",
    type=int,
    metavar="K",
    help="A threshold slot: any K of the METHODs together open the vault (with --group: K groups).",
)
@click.option(
    "--group",
    "groups",
    multiple=True,
    metavar="K:METHOD,...",
    help="A group of a threshold slot: K of its methods make the group, e.g. 2:tpm,hsm,fido "
    "(repeat it; --threshold then counts groups, default all).",
)
@click.option(
    "--exclusive",
    is_flag=True,
    help="Threshold: remove every other key slot (but recovery shares) in the same commit.",
)
@click.option(
    "--passphrase",
    "new_pass",
    multiple=True,
    metavar="REF",
    help="For passphrase methods: the new passphrase as env:NAME, file:PATH or prompt "
    "(repeat it for several passphrase members, in order; default prompt).",
)
@click.option(
    "--pcrs",
    metavar="LIST",
    help="For a sealing backend that can: bind the slot to these PCRs, e.g. 7,11.",
)
@click.option(
    "--pin", is_flag=True, help="For a sealing backend that can: also require its PIN to unseal."
)
@click.option(
    "--no-touch",
    "no_touch",
    is_flag=True,
    help="For a FIDO2 security key: unseal without a touch (user presence not required).",
)
@allow_weak_option
@pass_state
def vault_enroll(
    state: State,
    methods: tuple[str, ...],
    threshold_k: int | None,
    groups: tuple[str, ...],
    exclusive: bool,
    new_pass: tuple[str, ...],
    pcrs: str | None,
    pin: bool,
    no_touch: bool,
) -> None:
    """Add a key slot: `passphrase`, or the name of a backend that can seal (tpm, fido, ...).

    With --threshold K (and/or --group), the slot opens only when K of the methods succeed,
    e.g. `vault enroll --threshold 2 tpm hsm passphrase`. Name several methods of one kind
    METHOD:NAME (passphrase:alice passphrase:bob); see docs/threshold.md.
    """
    options: dict[str, Any] = {}
    if no_touch:
        options["touch"] = False
    if pcrs is not None:
        try:
            options["pcrs"] = [int(p) for p in pcrs.replace(" ", "").split(",") if p]
        except ValueError:
            raise click.UsageError("--pcrs takes PCR numbers separated by commas, e.g. 7,11")
    if pin:
        options["pin"] = True
    if threshold_k is not None or groups:
        _enroll_threshold(state, methods, threshold_k, groups, exclusive, new_pass, options)
        return
    if exclusive:
        raise click.UsageError("--exclusive is for threshold slots (--threshold or --group)")
    if len(methods) != 1:
        raise click.UsageError(
            "give one METHOD, or --threshold K with several (e.g. --threshold 2 tpm hsm passphrase)"
        )
    (method,) = methods
    if len(new_pass) > 1:
        raise click.UsageError("--passphrase is given once for one passphrase slot")
    if method == "passphrase" and options:
        raise click.UsageError(
            "--pcrs, --pin and --no-touch are for sealing backends, not passphrase"
        )
    v = _vault(state, "vault enroll")
    v.unlock()
    if method == "passphrase":
        ref = new_pass[0] if new_pass else "prompt"
        options["passphrase"] = new_passphrase(ref, "New passphrase: ")
    slot = v.enroll(method, options)
    state.emit(slot, f"enrolled {slot['method']} as key slot {slot['id']}")


def _enroll_threshold(
    state: State,
    methods: tuple[str, ...],
    threshold_k: int | None,
    group_specs: tuple[str, ...],
    exclusive: bool,
    new_pass: tuple[str, ...],
    options: dict[str, Any],
) -> None:
    from ..threshold import Group, Member, Policy, parse_group, parse_member

    if group_specs:
        groups = [parse_group(g) for g in group_specs]
        groups += [Group(1, (parse_member(m),)) for m in methods]  # bare methods: required
        k = len(groups) if threshold_k is None else threshold_k
    else:
        if not methods:
            raise click.UsageError("--threshold K needs the METHODs to split over")
        assert threshold_k is not None
        groups = [Group(threshold_k, tuple(parse_member(m) for m in methods))]
        k = 1
    Policy(k, tuple(groups)).validated()  # before any prompt
    ks = state.local("vault enroll")
    passphrases = list(new_pass)
    used_options: set[str] = set()
    members_out: list[Group] = []
    for g in groups:
        built: list[Member] = []
        for m in g.members:
            opts: dict[str, Any] = {}
            if m.method == "passphrase":
                ref = passphrases.pop(0) if passphrases else "prompt"
                opts["passphrase"] = new_passphrase(ref, f"New passphrase for {m.name}: ")
            else:
                kind = ks.backend(m.method).type_name
                wanted = {"tpm": {"pcrs", "pin"}, "fido": {"touch", "pin"}}.get(kind, set())
                opts = {o: v for o, v in options.items() if o in wanted}
                used_options |= set(opts)
            built.append(Member(m.method, m.label, opts))
        members_out.append(Group(g.threshold, tuple(built)))
    if passphrases:
        raise click.UsageError("more --passphrase values than passphrase methods")
    unused = set(options) - used_options
    if unused:
        names = {"pcrs": "--pcrs", "pin": "--pin", "touch": "--no-touch"}
        raise click.UsageError(
            f"{', '.join(sorted(names[o] for o in unused))}: no method of the slot takes it"
        )
    policy = Policy(k, tuple(members_out)).validated()
    v = _vault(state, "vault enroll")
    v.unlock()
    slot = v.enroll_threshold(policy, exclusive=exclusive)
    state.emit(slot, f"enrolled threshold key slot {slot['id']}: {slot['policy']}")
    alone = [
        f"{s['id']} ({s['method']})"
        for s in v.vault_status().get("slots", [])
        if s.get("method") not in ("threshold", "recovery")
    ]
    if alone and not state.json:
        click.echo(
            f"note: key slots {', '.join(alone)} still open the vault on their own; "
            "remove them with `strongroom vault unenroll ID` (or enroll with --exclusive)",
            err=True,
        )


@vault.command("unenroll")
@click.argument("slot_id")
@pass_state
def vault_unenroll(state: State, slot_id: str) -> None:
    """Remove a key slot (never the last one)."""
    v = _vault(state, "vault unenroll")
    v.unlock()
    v.unenroll(slot_id)
    state.emit({"removed": slot_id}, f"removed key slot {slot_id}")


@vault.command("passphrase")
@click.option(
    "--new",
    "new_pass",
    default="prompt",
    show_default=True,
    help="The new passphrase as env:NAME, file:PATH or prompt.",
)
@allow_weak_option
@pass_state
def vault_passphrase(state: State, new_pass: str) -> None:
    """Change the vault passphrase; the old one stops working."""
    v = _vault(state, "vault passphrase")
    v.unlock()
    v.change_passphrase(new_passphrase(new_pass, "New passphrase: ", "--new"))
    state.emit({"changed": True}, "vault passphrase changed")


@vault.command("recovery-shares")
@click.option("--threshold", "threshold_k", type=int, required=True, metavar="K")
@click.option("--shares", type=int, required=True, metavar="N")
@click.option(
    "--passphrase",
    "share_pass",
    default=None,
    help="A SLIP-39 passphrase on the shares, as env:NAME, file:PATH or prompt (default: "
    "none); it is needed again to recover.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False),
    help="Also write each share to DIR/share-I-of-N.txt (mode 600).",
)
@allow_weak_option
@pass_state
def vault_recovery_shares(
    state: State, threshold_k: int, shares: int, share_pass: str | None, out_dir: str | None
) -> None:
    """Print N SLIP-39 mnemonic shares, any K of which open the vault (`vault recover`).

    They replace any earlier set, whose shares stop working. Print them once, write them
    down and keep them apart.
    """
    from ..threshold import check_recovery_shape

    check_recovery_shape([(threshold_k, shares)])  # before any prompt
    passphrase = "" if share_pass is None else new_passphrase(share_pass, "Share passphrase: ")
    v = _vault(state, "vault recovery-shares")
    v.unlock()
    groups = v.recovery_shares(threshold_k, shares, passphrase)
    mnemonics = [m for g in groups for m in g]
    if out_dir is not None:
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for i, m in enumerate(mnemonics, 1):
            write_output(str(directory / f"share-{i}-of-{len(mnemonics)}.txt"), (m + "\n").encode())
    state.emit(
        {"threshold": threshold_k, "shares": mnemonics, "passphrase": bool(passphrase)},
        lambda: "\n".join(mnemonics),
    )
    if not state.json:
        click.echo(
            f"{len(mnemonics)} recovery shares; any {threshold_k} open the vault with "
            "`strongroom vault recover`. Keep them apart and offline.",
            err=True,
        )


@vault.command("recover")
@click.option(
    "--share-file",
    "share_files",
    multiple=True,
    metavar="FILE",
    help="A file of mnemonic shares, one per line (repeatable; - is stdin). Default: stdin, "
    "or a prompt per share on a terminal.",
)
@click.option(
    "--passphrase",
    "share_pass",
    default=None,
    help="The shares' SLIP-39 passphrase, as env:NAME, file:PATH or prompt (default: none).",
)
@click.option(
    "--new-passphrase",
    "new_pass",
    default="prompt",
    show_default=True,
    help="The new vault passphrase to enroll once open (replaces the passphrase slot).",
)
@click.option(
    "--check-only", is_flag=True, help="Only check that the shares open the vault; change nothing."
)
@allow_weak_option
@pass_state
def vault_recover(
    state: State,
    share_files: tuple[str, ...],
    share_pass: str | None,
    new_pass: str,
    check_only: bool,
) -> None:
    """Open the vault with K recovery shares when the other methods are gone, and enroll a new
    passphrase. Then remove the dead key slots with `vault unenroll`."""
    mnemonics = _read_mnemonics(share_files)
    passphrase = "" if share_pass is None else secret_source(share_pass, "Share passphrase: ").get()
    v = _vault(state, "vault recover")
    slot_id = v.recover(mnemonics, passphrase)
    result: dict[str, Any] = {"recovered": True, "recovery_slot": slot_id}
    if not check_only:
        v.change_passphrase(new_passphrase(new_pass, "New vault passphrase: ", "--new-passphrase"))
        result["new_passphrase"] = True
    status = v.vault_status()
    result["slots"] = status.get("slots", [])

    def text() -> str:
        lines = [f"vault opened with recovery shares (key slot {slot_id}): {status['keys']} keys"]
        if not check_only:
            lines.append("new vault passphrase enrolled (it replaces any passphrase slot)")
        lines.append("key slots now (remove dead ones with `strongroom vault unenroll ID`):")
        lines += [
            f"  {s['id']}  {s['method']}" + (f"  {s['policy']}" if s.get("policy") else "")
            for s in result["slots"]
        ]
        return "\n".join(lines)

    state.emit(result, text)


def _read_mnemonics(files: tuple[str, ...]) -> list[str]:
    """Mnemonics from files (one per line, # comments), stdin, or prompts on a terminal."""
    if not files and sys.stdin.isatty():
        out: list[str] = []
        click.echo("Type the recovery shares, one per line; an empty line ends.", err=True)
        while True:
            line = click.prompt(
                f"Share {len(out) + 1}", default="", show_default=False, err=True, hide_input=True
            )
            if not line.strip():
                return out
            out.append(line)
    lines: list[str] = []
    for f in files or ("-",):
        try:
            text = read_input(f).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(f"{f} is not a text file of mnemonic shares") from None
        lines += [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return lines


@vault.command("backup")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_state
def vault_backup(state: State, file: str) -> None:
    """Write a backup of the vault as a snapshot file (it opens with the same unlock
    methods; checked against the manifest first)."""
    v = _vault(state, "vault backup")
    v.backup(Path(file))
    state.emit({"backup": file}, f"vault backed up to {file}")


@vault.command("verify")
@pass_state
def vault_verify(state: State) -> None:
    """Check every key record against the vault's manifest (reads them all)."""
    v = _vault(state, "vault verify")
    report = v.verify_store()
    state.emit(
        report,
        f"vault verified: {report['keys']} key records match its manifest "
        f"(change {report['generation']})",
    )


@vault.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_state
def vault_restore_cmd(state: State, file: str) -> None:
    """Replace the vault with a backup (checked first) and update the catalog."""
    report = vault_restore(state.local("vault restore"), file)
    state.emit(
        report,
        f"restored {report['keys']} keys from {file}"
        + (
            f"; name conflicts left alone: {', '.join(report['conflicts'])}"
            if report["conflicts"]
            else ""
        ),
    )
