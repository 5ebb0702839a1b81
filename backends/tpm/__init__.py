"""The TPM 2.0 backend (tpm2-pytss). Imports without tpm2-pytss; it then reports why."""

from .backend import TpmBackend

__all__ = ["TpmBackend"]
