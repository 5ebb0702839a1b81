"""Finding and building backends: the entry-point group, each backend's `BackendContext`
(its config table checked against `config_keys`), attestation verifiers, and the process
hardening a keystore does once its backends exist.

Backends are found through the `strongroom.backends` entry-point group, the built-in ones
included, and only the types a config names are imported. The keystore routes and audits;
this module knows nothing of keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from importlib import metadata
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .backend import (
    AttestationVerifier,
    Backend,
    BackendContext,
    DeviceFactory,
    MonotonicCounter,
    PresencePrompt,
    Sealer,
)
from .config import BackendConfig, Config
from .errors import AttestationInvalid, BackendUnavailable, ConfigError
from .secrets import Prompter, SecretSource, validate_reference
from .storage import VaultRecords

ENTRY_POINT_GROUP = "strongroom.backends"


def backend_classes(types: Iterable[str] | None = None) -> dict[str, type[Backend] | str]:
    """Backend classes by type name, found through the entry-point group.

    With `types`, only those entry points are imported (names not installed are left out),
    so a keystore loads the backends its config names and not every installed one: a
    vault-only command does not pay for importing python-pkcs11 or tpm2-pytss.
    A class that fails to import maps to the reason instead, so one broken plugin
    never stops the others.
    """
    wanted = None if types is None else set(types)
    found: dict[str, type[Backend] | str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if wanted is not None and ep.name not in wanted:
            continue
        try:
            cls = ep.load()
        except Exception as e:  # a plugin's import error becomes its reason
            found[ep.name] = f"the plugin {ep.value} failed to import: {type(e).__name__}: {e}"
            continue
        found[ep.name] = cls
    return found


def backend_type_names() -> list[str]:
    """The installed backend type names, without importing any backend."""
    return sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})


def build_backends(
    config: Config,
    prompter: Prompter,
    presence: PresencePrompt,
    sealer: Callable[[str], Sealer],
    device_factories: Mapping[str, DeviceFactory] | None = None,
    records: Callable[[str], VaultRecords] | None = None,
    owner: bytes = b"",
    counter: Callable[[str], MonotonicCounter] | None = None,
) -> tuple[dict[str, Backend], dict[str, tuple[str, str]]]:
    """Every backend `config` names, built: (backends by name, {name: (type, reason)} for
    those whose plugin failed to import). An unknown type is a ConfigError naming the file
    and line. `sealer(name)` is handed to each backend's context: the keystore's lookup of
    another configured backend that can seal. `device_factories` gives a backend (by name)
    the device it uses instead of the one its config names (tests pass it; no config can).
    `records(name)` gives a transactional backend (the vault) its rows in the store, and
    `owner` is the store's id that device backends mark their new keys with, and
    `counter(name)` the keystore's lookup of a backend that keeps monotonic counters."""
    factories = device_factories or {}
    classes = backend_classes(b.type for b in config.backends.values())
    built: dict[str, Backend] = {}
    unusable: dict[str, tuple[str, str]] = {}
    for name, bcfg in config.backends.items():
        cls = classes.get(bcfg.type)
        if cls is None:
            raise config.error(
                f"unknown backend type {bcfg.type!r}; installed types: "
                f"{', '.join(backend_type_names()) or 'none'}",
                f"backends.{name}",
                "type",
            )
        if isinstance(cls, str):
            unusable[name] = (bcfg.type, cls)
            continue
        context = backend_context(
            config, bcfg, cls, prompter, presence, sealer, factories.get(name)
        )
        if cls.transactional and records is not None:
            context = replace(context, records=records(name))
        if owner:
            context = replace(context, owner=owner)
        if counter is not None:
            context = replace(context, counter=counter)
        built[name] = cls(context)
    return built, unusable


def backend_context(
    config: Config,
    bcfg: BackendConfig,
    cls: type[Backend],
    prompter: Prompter,
    presence: PresencePrompt,
    sealer: Callable[[str], Sealer],
    device_factory: DeviceFactory | None = None,
) -> BackendContext:
    """The context backend `bcfg` is built with: its settings checked against the class's
    `config_keys` (unknown key, wrong type, a secret that is not a reference: ConfigError
    naming the file, line and key), defaults filled in."""
    table = f"backends.{bcfg.name}"
    settings: dict[str, Any] = {}
    for key, value in bcfg.settings.items():
        spec = cls.config_keys.get(key)
        if spec is None:
            known = ", ".join(sorted(cls.config_keys)) or "none"
            raise config.error(
                f"unknown key for a {bcfg.type} backend; known keys: {known}", table, key
            )
        kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
        if not isinstance(value, spec.kind) or (isinstance(value, bool) and bool not in kinds):
            raise config.error(f"has the wrong type; expected {_kind_name(spec.kind)}", table, key)
        if spec.secret:
            for ref in value if isinstance(value, list) else [value]:
                try:
                    validate_reference(str(ref))
                except ValueError as e:
                    raise config.error(str(e), table, key) from None
        settings[key] = value
    for key, spec in cls.config_keys.items():
        if key not in settings and spec.default is not None:
            settings[key] = spec.default

    def secret(setting: str, prompt: str) -> SecretSource:
        value = settings.get(setting)
        refs = value if isinstance(value, list) else ([value] if value else [])
        return SecretSource([str(r) for r in refs], prompt, prompter)

    def config_error(message: str, key: str) -> ConfigError:
        return config.error(message, table, key)

    return BackendContext(
        bcfg.name,
        config.data_dir,
        settings,
        secret,
        sealer,
        config_error,
        presence=presence,
        device_factory=device_factory,
    )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        bool: "true or false",
        int: "an integer",
        str: "a string",
        list: "a list",
        float: "a number",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def verify_attestation(
    statement: dict[str, Any],
    nonce: bytes | None = None,
    trusted_signer: PublicKeyTypes | None = None,
    expected_public: PublicKeyTypes | None = None,
) -> dict[str, Any]:
    """Check a statement made by `Keystore.attest`, with the verifier of its backend type.

    Needs no config and no device. Returns what the statement proves; raises
    AttestationInvalid when a check fails.
    """
    if not isinstance(statement, dict):
        raise AttestationInvalid("an attestation statement is a JSON object")
    btype = statement.get("backend_type")
    cls = backend_classes([str(btype)]).get(str(btype))
    if isinstance(cls, str):
        raise BackendUnavailable(str(btype), cls)
    if cls is None or not isinstance(cls, AttestationVerifier):
        raise AttestationInvalid(f"no installed backend verifies statements of type {btype!r}")
    return cls.verify_attestation(statement, nonce, trusted_signer, expected_public)


def harden_process(core_dumps: bool) -> None:
    """Purge guarded memory on SIGTERM/SIGINT/exit; unless allowed, no core dumps or ptrace."""
    try:
        from .memory import disable_core_dumps, install_purge_handlers
    except ImportError:  # the native extension is missing; `strongroom doctor` says so
        return
    install_purge_handlers()
    if not core_dumps:
        with contextlib.suppress(OSError):
            disable_core_dumps()
