"""Import layers of core/ and backends/, checked on the source (docs/decisions.md, "Import
layers are a test").

An `ast` walk over every module of the package sees every import: at module level, inside a
function (a lazy import), under `if TYPE_CHECKING`, relative or absolute, and
`importlib.import_module("literal")`. A hidden edge is still an edge: lazy and type-only
imports are how import circles hid before. Import names follow pyproject.toml's
package-dir: `strongroom` is core/, `strongroom.backends` is backends/.

The rules (ARCHITECTURE.md, "Dependency rules after"):

- no import cycle among strongroom modules;
- imports point down the layers (`may_import`): the contract (R1) imports only itself, the
  runtime (R2) itself and errors, the engine (R3) those two (the keystore also the rest of
  the engine and the recipes, discovery also config, the audit/ package also itself, config
  and the config_*.py modules split out of it each other, the catalog and the store modules
  the store modules), the
  recipes (R4: envelope, pkey) the contract; the service/ package (R5, a face) anything
  below it, but its client only its wire format, the contract and the recipes, so that a
  client installs no server side; the SSH agent (sshagent/, a face) the contract, audit/
  and itself, never the keystore; the PKCS#11 server (pkcs11server/) the contract and
  itself; nothing
  below the service imports it; nothing outside the CLI's package (cli/) imports it or any
  of its modules;
- a backend (R6) imports only the contract and runtime layers and its own package: never
  the engine (config, catalog, audit, keystore, ...), a face (service, cli), or
  another backend;
- each native library is imported by the modules `NATIVE_IMPORTERS` names, and no other.

`KNOWN_VIOLATIONS` lists the edges that still break a rule, each with why; the test fails
when one of them is gone, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = (("strongroom.backends", ROOT / "backends"), ("strongroom", ROOT / "core"))
"""pyproject.toml's [tool.setuptools.package-dir], the more specific folder first."""

CONTRACT = frozenset(
    {
        "strongroom.errors",
        "strongroom.types",
        "strongroom.backend",
        "strongroom.algorithms",
        "strongroom.lifecycle",
        "strongroom.secrets",
        "strongroom.threshold",
        "strongroom.strictjson",
        "strongroom.api",  # KeyAPI (ARCHITECTURE.md, step 1), being added
        "strongroom.storage",  # VaultRecords: what the vault writes its rows through
    }
)
"""R1: what a backend is written against. strictjson (strict JSON parsing, no imports of
ours) is a helper of this layer; the vault's snapshot and catalog records use it."""
RUNTIME = frozenset(
    {"strongroom.memory", "strongroom.memory_process", "strongroom.sodium", "strongroom._native"}
)
"""R2: guarded memory and the libsodium calls on it. memory_process.py (purge, memlock status,
core dumps) is split out of memory.py, which exports its names."""
AUDIT = frozenset(
    {
        "strongroom.audit",
        "strongroom.audit.writer",
        "strongroom.audit.log",
        "strongroom.audit.signer",
    }
)
"""The audit/ package: the writer, the log format and the checkpoint signer Protocol."""
STORE = frozenset(
    {
        "strongroom.store",
        "strongroom.store_sqlite",
        "strongroom.store_pg",
        "strongroom.store_chain",
        "strongroom.store_lease",
    }
)
"""The transactional store under the catalog (core/store.py): the Protocol and its SQLite and
PostgreSQL implementations, where every difference between the two databases lives, and the
hash-chained table the audit chain of a shared store is appended to (store_chain.py: it
knows rows and hashes, not the audit package, which reaches it through `audit.ChainLog`), and
the leases of singleton jobs on the database's clock (store_lease.py)."""
CONFIG = frozenset({"strongroom.config", "strongroom.config_schema", "strongroom.config_faces"})
"""The configuration (core/config.py) and the modules split out of it (docs/decisions.md,
"Modules split along their banners"): the tables' keys and dataclasses (config_schema.py)
and the faces' tables (config_faces.py). They import each other, and no other engine module;
`strongroom.config` exports their names."""
ENGINE = (
    AUDIT
    | STORE
    | CONFIG
    | {
        "strongroom.catalog",
        "strongroom.vaultstore",
        "strongroom.discovery",
        "strongroom.keystore",
        "strongroom.keystore_lifecycle",
        "strongroom.keystore_seeds",
        "strongroom.keystore_signer",
        "strongroom.keystore_vault",
        "strongroom.keystore_certs",
        "strongroom.keystore_repair",
        "strongroom.keystore_operations",
        "strongroom.keystore_placement",
        "strongroom.keystore_audited",
    }
)
"""R3. The faces (service/, cli/, the package's `__init__`, the shipped contract suite and
the aliases at the service's old paths) are every other core module."""
KEYSTORE_MIXINS = frozenset(
    {
        "strongroom.keystore_lifecycle",
        "strongroom.keystore_seeds",
        "strongroom.keystore_certs",
        "strongroom.keystore_operations",
        "strongroom.keystore_placement",
    }
)
"""Mixins of `Keystore` in modules of their own (docs/decisions.md, "Modules split along
their banners"): they may use the catalog and config types the keystore holds."""
KEYSTORE_PARTS = frozenset(
    {
        "strongroom.keystore_signer",
        "strongroom.keystore_vault",
        "strongroom.keystore_repair",
        "strongroom.keystore_audited",
    }
)
"""Code that takes a keystore through a Protocol of what it uses (the audit checkpoint
signer, the audited vault commands and vault restore), and the keystore's audited-operation
context manager (keystore_audited.py, on the audit log alone): besides the catalog, the
signer uses the audit package's signature type and key fingerprint. Never the keystore
itself."""
RECIPES = frozenset({"strongroom.envelope", "strongroom.pkey"})
"""R4: recipes typed against KeyAPI, importing only the contract: envelope encryption of
streams, and keys as `cryptography` private keys. The keystore and the service's client
return them, so both may import them."""
CLI = "strongroom.cli"
"""The command line, a face: the `cli/` package. Its modules import each other; nothing
outside it imports any of them."""
SERVICE = "strongroom.service"
CLIENT = "strongroom.service.client"
WIRE = "strongroom.service.wire"
SSHAGENT = "strongroom.sshagent"
"""The SSH agent, a face over KeyAPI: the contract, `audit` (the principal of its sign
records) and itself; never the keystore, so it serves a RemoteKeystore the same way."""
UNIXSERVER = "strongroom.unixserver"
"""The Unix-socket server the local faces share (socket, accept loop, peer credentials): it
imports errors only, and only the faces built on it import it."""
PKCS11SERVER = "strongroom.pkcs11server"
"""The PKCS#11 server, a face over KeyAPI like the SSH agent: the contract and itself; never
the keystore, so it serves a RemoteKeystore the same way."""
KMIP = "strongroom.kmip"
"""The KMIP server, a face over KeyAPI: the contract, `audit` (the actor of its records),
the service's tenants (certificate to identity, policies), the store's Protocol and its
SQLite file (the table of KMIP objects) and itself; never the keystore."""
OLD_SERVICE_PATHS = frozenset({"strongroom.server", "strongroom.client", "strongroom.tenants"})
"""Modules kept at the service's old import paths for the names docs give: they only
re-export strongroom.service (R5: faces, like the package's `__init__`)."""


def in_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


NATIVE_IMPORTERS: Mapping[str, frozenset[str]] = {
    # One adapter per library: the rule holds. The TPM's device layer is device.py (key
    # operations, sealing; the only module backend.py imports) and the three modules it is
    # built from: context.py (ESAPI context, SRK, slots, sessions), recovery.py (what an error
    # means; reclaiming dead clients' objects), templates.py and facts.py.
    "tpm2_pytss": frozenset(
        {
            "strongroom.backends.tpm.context",
            "strongroom.backends.tpm.device",
            "strongroom.backends.tpm.facts",
            "strongroom.backends.tpm.recovery",
            "strongroom.backends.tpm.templates",
        }
    ),
    # Not yet one module: these sets may only shrink (ARCHITECTURE.md, "Device adapters
    # with a stated boundary"). availability() probes (`import fido2`, `import smartcard`)
    # count too.
    "pkcs11": frozenset(
        {
            "strongroom.backends.pkcs11.backend",
            "strongroom.backends.pkcs11.errors",
            "strongroom.backends.pkcs11.token",
            # Pkcs11Backend's mixins, split out of backend.py (discovery, key creation,
            # adopt, wrap/unwrap and Sealer methods): the same calls on python-pkcs11
            # objects, now in five more files.
            "strongroom.backends.pkcs11.adopt",
            "strongroom.backends.pkcs11.discovery",
            "strongroom.backends.pkcs11.keygen",
            "strongroom.backends.pkcs11.sealer",
            "strongroom.backends.pkcs11.wrap",
        }
    ),
    # The PostgreSQL driver: the store's one adapter (core/store_pg.py).
    "psycopg": frozenset({"strongroom.store_pg"}),
    "fido2": frozenset(
        {
            "strongroom.backends.fido.assertion",
            "strongroom.backends.fido.backend",
            "strongroom.backends.fido.devices",
            "strongroom.backends.fido.session",
        }
    ),
    "smartcard": frozenset(
        {
            "strongroom.backends.piv.backend",
            "strongroom.backends.piv.card",
            "strongroom.backends.fido.devices",  # CTAP over PC/SC lists the readers
        }
    ),
    # libsodium: memory.py's own BLAKE2b and random fill, sodium.py for everything else,
    # and the vault's BIP-39/SLIP-10 procedures (PyNaCl's bindings, on bytes).
    "nacl": frozenset(
        {"strongroom.memory", "strongroom.sodium", "strongroom.backends.vault.procedures"}
    ),
    # Our C extension: memory.py (guarded memory) with memory_process.py (purge, memlock
    # status, core dumps: process-wide calls, split out of memory.py), the audit writer (one
    # call per record, the hot path) and the vault's key operations.
    "strongroom._native": frozenset(
        {
            "strongroom.memory",
            "strongroom.memory_process",
            "strongroom.audit.writer",
            "strongroom.backends.vault.keyops",
        }
    ),
}

KNOWN_VIOLATIONS = frozenset({})
"""(importer, imported) edges that still break a rule; each must still exist."""


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


def module_name(path: Path) -> str | None:
    for package, folder in PACKAGE_DIRS:
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    return None


def package_modules() -> dict[str, Path]:
    """Every module of the package by import name; an extension counts by its stub."""
    found: dict[str, Path] = {}
    for _, folder in PACKAGE_DIRS:
        for path in sorted([*folder.rglob("*.py"), *folder.rglob("*.pyi")]):
            name = module_name(path)
            if name is not None and "__pycache__" not in path.parts:
                found.setdefault(name, path)
    return found


def imports_of(name: str, source: str, is_package: bool, modules: Iterable[str]) -> list[Import]:
    """Every import in `source` (module `name`) as the strongroom module or the top-level
    external package it names. Importing a submodule also runs its parent packages'
    `__init__`; like import-linter, that implicit edge is not counted."""
    known = set(modules)
    here = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str, line: int) -> None:
        if target.startswith("strongroom.") or target == "strongroom":
            while target not in known and "." in target:
                target = target.rpartition(".")[0]  # an attribute of a module
        else:
            target = target.partition(".")[0]
        if target != name:
            found.append(Import(name, target, line))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in known else base, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value, node.lineno)
    return found


def all_imports() -> list[Import]:
    modules = package_modules()
    found: list[Import] = []
    for name, path in modules.items():
        if path.suffix == ".py":
            found += imports_of(name, path.read_text(), path.name == "__init__.py", modules)
    return found


def graph_of(imports: Iterable[Import]) -> dict[str, set[str]]:
    """Edges between strongroom modules."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.imported.startswith("strongroom"):
            graph.setdefault(i.importer, set()).add(i.imported)
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def may_import(importer: str, imported: str) -> bool:
    """Whether the layers let `importer` import the strongroom module `imported`."""
    if in_cli(imported):
        return in_cli(importer)
    if importer.startswith("strongroom.backends."):
        own = ".".join(importer.split(".")[:3])
        return imported == own or imported.startswith(own + ".") or imported in CONTRACT | RUNTIME
    if importer in CONTRACT:
        return imported in CONTRACT
    if importer in RUNTIME:
        return imported in RUNTIME or imported == "strongroom.errors"
    if importer == "strongroom.keystore":
        return imported in CONTRACT | RUNTIME | ENGINE | RECIPES
    if importer in KEYSTORE_MIXINS:  # parts of the Keystore class: never the keystore itself
        return imported in CONTRACT | RUNTIME | {"strongroom.catalog", "strongroom.config"}
    if importer in KEYSTORE_PARTS:  # a keystore behind a Protocol: never the keystore itself
        return imported in CONTRACT | RUNTIME | AUDIT | {"strongroom.catalog"}
    if importer in AUDIT:  # no other engine module: the keystore hands it a CheckpointSigner
        return imported in CONTRACT | RUNTIME | AUDIT
    if importer in STORE:  # the databases: below the catalog, above nothing of the engine
        return imported in CONTRACT | RUNTIME | STORE
    if importer == "strongroom.catalog":  # its SQL runs on the store
        return imported in CONTRACT | RUNTIME | STORE
    if importer == "strongroom.vaultstore":  # the store's vault tables, over the catalog's db
        return imported in CONTRACT | RUNTIME | {"strongroom.catalog"}
    if importer == "strongroom.discovery":
        return imported in CONTRACT | RUNTIME | {"strongroom.config"}
    if importer in CONFIG:  # config.py and its parts: each other, no other engine module
        return imported in CONTRACT | RUNTIME | CONFIG
    if importer in ENGINE:
        return imported in CONTRACT | RUNTIME
    if importer in RECIPES:
        return imported in CONTRACT
    if importer == UNIXSERVER:
        return imported == "strongroom.errors"
    if importer == SSHAGENT or importer.startswith(SSHAGENT + "."):
        return (
            imported in CONTRACT | AUDIT
            or imported == UNIXSERVER
            or imported == SSHAGENT
            or imported.startswith(SSHAGENT + ".")
        )
    if importer == PKCS11SERVER or importer.startswith(PKCS11SERVER + "."):
        return (
            imported in CONTRACT
            or imported == UNIXSERVER
            or imported == PKCS11SERVER
            or imported.startswith(PKCS11SERVER + ".")
        )
    if importer == KMIP or importer.startswith(KMIP + "."):
        return (
            imported in CONTRACT | AUDIT
            or imported in {"strongroom.service.tenants", "strongroom.service.wire"}
            # its object table, in the store the tenants use (docs/decisions.md)
            or imported in {"strongroom.store", "strongroom.store_sqlite"}
            or imported == KMIP
            or imported.startswith(KMIP + ".")
        )
    if importer == WIRE:  # the wire format: what client and server share, nothing else
        return imported in CONTRACT
    if importer == CLIENT:  # a client installs no server side
        return imported in CONTRACT | RECIPES or imported == WIRE
    if imported == SERVICE or imported.startswith(SERVICE + "."):
        # Only the faces above the service import it: the package's `__init__` (connect),
        # the CLI and the aliases at the old paths (and the service itself).
        return (
            importer in {"strongroom", *OLD_SERVICE_PATHS}
            or in_cli(importer)
            or importer.startswith(SERVICE)
        )
    return True  # a face: anything below it


def layer_violations(imports: Iterable[Import]) -> list[Import]:
    return [
        i
        for i in imports
        if i.imported.startswith("strongroom")
        and not may_import(i.importer, i.imported)
        and (i.importer, i.imported) not in KNOWN_VIOLATIONS
    ]


def native_importers(imports: Iterable[Import]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {lib: set() for lib in NATIVE_IMPORTERS}
    for i in imports:
        if i.imported in found:
            found[i.imported].add(i.importer)
    return found


def where(i: Import) -> str:
    return f"{i.importer} imports {i.imported} (line {i.line})"


# -- the rules, on the real tree -------------------------------------------------------------------
@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = all_imports()
    assert len({i.importer for i in found}) > 40, "the walk found too few modules"
    return found


def test_the_known_violations_still_exist(imports: list[Import]) -> None:
    edges = {(i.importer, i.imported) for i in imports}
    gone = KNOWN_VIOLATIONS - edges
    assert not gone, f"fixed, remove from KNOWN_VIOLATIONS: {sorted(gone)}"


def test_no_import_cycle(imports: list[Import]) -> None:
    graph = graph_of(i for i in imports if (i.importer, i.imported) not in KNOWN_VIOLATIONS)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_point_down_and_backends_use_only_the_contract_and_runtime(
    imports: list[Import],
) -> None:
    bad = layer_violations(imports)
    assert not bad, "\n".join(map(where, bad))


def test_each_native_library_is_imported_where_stated(imports: list[Import]) -> None:
    found = native_importers(imports)
    wrong = {
        lib: sorted(found[lib] ^ expected)
        for lib, expected in NATIVE_IMPORTERS.items()
        if found[lib] != expected
    }
    assert not wrong, f"importers differ from NATIVE_IMPORTERS (symmetric difference): {wrong}"


# -- the checks themselves can fail --------------------------------------------------------------
SYNTHETIC = {
    "strongroom.backends.demo.backend": (
        "from typing import TYPE_CHECKING\n"
        "from strongroom.errors import InvalidArgument\n"
        "from . import helpers\n"
        "if TYPE_CHECKING:\n"
        "    from strongroom.keystore import Keystore\n"
        "def f():\n"
        "    from ..vault import sodium\n"
        "    import importlib\n"
        "    importlib.import_module('tpm2_pytss.constants')\n"
    ),
    "strongroom.backends.demo.helpers": "from strongroom import memory, sodium\n",
    "strongroom.a": "from . import b\n",
    "strongroom.b": "def f():\n    from .c import x\n",
    "strongroom.c": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import strongroom.a\n"
    ),
    "strongroom.errors": "",
    "strongroom.memory": "from .keystore import Keystore\n",
    "strongroom.sodium": "",
    "strongroom.keystore": "",
    "strongroom.envelope": "import strongroom.keystore\n",
    "strongroom.pkey": "from . import catalog\n",
    "strongroom.service.app": "from ..cli import main\nfrom .. import keystore\n",
    "strongroom.service.tenants": "from ..cli.keys import key\n",
    "strongroom.service.client": "from . import wire\nfrom .. import errors, config\n",
    "strongroom.service.wire": "",
    "strongroom.service": "",
    "strongroom.testing.contract": "from ..service import client\n",
    "strongroom.cli.keys": "from ._io import table\nfrom .. import keystore\n",
    "strongroom.cli._io": "from ..errors import InvalidArgument\n",
    "strongroom.backends.vault.sodium": "",
    "strongroom.cli": "",
    "strongroom.config": "",
    "strongroom.catalog": "",
    "strongroom._native": "",
    "strongroom.audit.log": "from .. import errors\n",
    "strongroom.audit.writer": (
        "from .. import _native\nfrom .log import GENESIS\n"
        "def f():\n    from ..keystore import Keystore\n"
    ),
    "strongroom.discovery": "from .config import Config\nfrom .catalog import Catalog\n",
}


def synthetic_imports() -> list[Import]:
    found: list[Import] = []
    for name, source in SYNTHETIC.items():
        found += imports_of(name, source, False, SYNTHETIC)
    return found


def test_the_walk_sees_lazy_type_only_relative_and_importlib_imports() -> None:
    edges = {(i.importer, i.imported) for i in synthetic_imports()}
    demo = "strongroom.backends.demo.backend"
    assert {
        (demo, "strongroom.errors"),
        (demo, "strongroom.backends.demo.helpers"),
        (demo, "strongroom.keystore"),
        (demo, "strongroom.backends.vault.sodium"),
        (demo, "tpm2_pytss"),
        ("strongroom.backends.demo.helpers", "strongroom.memory"),
        ("strongroom.b", "strongroom.c"),
        ("strongroom.c", "strongroom.a"),
    } <= edges


def test_a_synthetic_cycle_is_caught_with_its_path() -> None:
    graph = graph_of(synthetic_imports())
    assert find_cycle(graph) == ["strongroom.a", "strongroom.b", "strongroom.c", "strongroom.a"]
    del graph["strongroom.c"]
    assert find_cycle(graph) is None


def test_synthetic_forbidden_edges_are_caught() -> None:
    bad = {(i.importer, i.imported) for i in layer_violations(synthetic_imports())}
    assert bad == {
        ("strongroom.backends.demo.backend", "strongroom.keystore"),  # the engine
        ("strongroom.backends.demo.backend", "strongroom.backends.vault.sodium"),  # a backend
        ("strongroom.memory", "strongroom.keystore"),  # runtime pointing up
        ("strongroom.service.app", "strongroom.cli"),  # nothing imports the CLI
        ("strongroom.service.tenants", "strongroom.cli.keys"),  # nor any module of it
        ("strongroom.service.client", "strongroom.config"),  # the client: wire and R1 only
        ("strongroom.testing.contract", "strongroom.service.client"),  # below the service
        ("strongroom.audit.writer", "strongroom.keystore"),  # audit/ imports no engine module
        ("strongroom.discovery", "strongroom.catalog"),  # discovery: config only
        ("strongroom.envelope", "strongroom.keystore"),  # a recipe is typed against KeyAPI
        ("strongroom.pkey", "strongroom.catalog"),  # and so is the private key adapter
    }
    assert not may_import("strongroom.envelope", "strongroom.keystore")
    assert may_import("strongroom.service.client", "strongroom.pkey")
    assert may_import("strongroom.keystore", "strongroom.pkey")
    assert may_import("strongroom.discovery", "strongroom.config")
    assert may_import("strongroom.catalog", "strongroom.store_sqlite")
    assert may_import("strongroom.store", "strongroom.store_pg")
    assert not may_import("strongroom.store_pg", "strongroom.catalog")
    assert not may_import("strongroom.store", "strongroom.config")
    assert not may_import("strongroom.catalog", "strongroom.config")
    assert may_import("strongroom.config", "strongroom.config_faces")
    assert may_import("strongroom.config_faces", "strongroom.config_schema")
    assert not may_import("strongroom.config_schema", "strongroom.catalog")
    assert not may_import("strongroom.keystore_lifecycle", "strongroom.config_schema")
    assert may_import("strongroom.keystore", "strongroom.discovery")
    assert may_import("strongroom.service.client", "strongroom.service.wire")
    assert not may_import("strongroom.service.client", "strongroom.service.tenants")
    assert may_import("strongroom.service.app", "strongroom.keystore")
    assert not may_import("strongroom.keystore", "strongroom.service.wire")
    assert may_import("strongroom.keystore", "strongroom.audit.log")
    assert not may_import("strongroom.keystore_lifecycle", "strongroom.keystore")
    assert not may_import("strongroom.keystore_signer", "strongroom.keystore")
    assert not may_import("strongroom.keystore_vault", "strongroom.keystore")
    assert may_import("strongroom.keystore", "strongroom.keystore_lifecycle")
    assert may_import("strongroom.cli.keys", "strongroom.cli._io")
    assert may_import("strongroom.cli", "strongroom.cli.keys")
    assert not may_import("strongroom.clients", "strongroom.cli")
    assert not may_import("strongroom.audit.log", "strongroom.config")
    assert may_import("strongroom.sshagent.agent", "strongroom.api")
    assert may_import("strongroom.sshagent.agent", "strongroom.sshagent.wire")
    assert not may_import("strongroom.sshagent.agent", "strongroom.keystore")
    assert not may_import("strongroom.sshagent.server", "strongroom.service.client")
    assert may_import("strongroom.pkcs11server.token", "strongroom.api")
    assert may_import("strongroom.pkcs11server.token", "strongroom.pkcs11server.wire")
    assert not may_import("strongroom.pkcs11server.token", "strongroom.keystore")
    assert not may_import("strongroom.pkcs11server.server", "strongroom.sshagent.server")
    found = native_importers(synthetic_imports())
    assert found["tpm2_pytss"] == {"strongroom.backends.demo.backend"}
