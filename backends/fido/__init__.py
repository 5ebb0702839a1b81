"""FIDO2 security keys (YubiKey, SoloKey, any CTAP2 authenticator) through python-fido2.

Importing this package needs nothing beyond Strongroom itself: without python-fido2 the
backend still loads and reports itself unavailable, with the reason. The assertion
verifier for relying parties is in `strongroom.backends.fido.assertion` (needs fido2).
"""

from .backend import FidoBackend, prf_salt

__all__ = ["FidoBackend", "prf_salt"]
