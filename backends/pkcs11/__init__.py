"""PKCS#11 backend: keys in any PKCS#11 token, through python-pkcs11 (docs/pkcs11.md)."""

from .backend import Pkcs11Backend

__all__ = ["Pkcs11Backend"]
