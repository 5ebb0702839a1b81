"""The audit log (docs/audit.md): `writer` appends records, `log` reads and verifies them,
`signer` states what signs the checkpoints.

The package imports only the contract layer, `_native` (the writer's hot path) and
cryptography: the Keystore hands the writer a `CheckpointSigner` instead of being imported.
"""

from __future__ import annotations

from .log import (
    ChainLog,
    Problem,
    VerifyReport,
    chain_records,
    last_seq,
    read_records,
    verify_chain,
    verify_log,
)
from .signer import CheckpointSignature, CheckpointSigner
from .writer import Audit, AuditEvent, current_principal, current_requester, default_actor

__all__ = [
    "Audit",
    "AuditEvent",
    "ChainLog",
    "CheckpointSignature",
    "CheckpointSigner",
    "Problem",
    "chain_records",
    "VerifyReport",
    "current_principal",
    "current_requester",
    "default_actor",
    "last_seq",
    "read_records",
    "verify_chain",
    "verify_log",
]
