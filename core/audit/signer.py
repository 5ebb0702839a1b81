"""What signs the audit log's checkpoints (docs/audit.md, "Checkpoints").

The writer (`writer.Audit`) needs a signature over the chain now and then, made with a key
of the reserved namespace `_audit`. The Keystore implements `CheckpointSigner`
(`strongroom.keystore_signer._KeystoreSigner`) and hands it to the writer, so nothing in this
package imports the keystore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ..types import KeyInfo


@dataclass(frozen=True)
class CheckpointSignature:
    key: str
    backend: str
    alg: str
    signer: str
    sig: bytes


class CheckpointSigner(Protocol):
    """Signs the writer's checkpoints with a key of the reserved namespace `_audit`.

    The Keystore implements it (`strongroom.keystore_signer._KeystoreSigner`) and hands it to
    `Audit`: the writer calls back into the keystore only through these four methods.
    """

    def ready(self, force: bool) -> bool:
        """Whether a checkpoint can be signed now; with `force`, always (it may then open,
        that is unlock, the signing key's backend). Without it, never prompts."""
        ...

    def info(self, create: bool) -> KeyInfo | None:
        """The signing key; made now when missing and `create`, else None when missing."""
        ...

    def public_key(self, create: bool = False) -> PublicKeyTypes | None:
        """The signing key's public key (None when it does not exist and not `create`)."""
        ...

    def sign(self, message: bytes) -> CheckpointSignature:
        """Sign `message` (a `log.checkpoint_message`), making the key on first use."""
        ...
