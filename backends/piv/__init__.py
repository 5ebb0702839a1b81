"""PIV smart cards over PC/SC (see docs/piv.md)."""

from .backend import PivBackend

__all__ = ["PivBackend"]
