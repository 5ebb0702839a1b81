"""Builds the native extension (guarded memory, audit append, vault key operations);
everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "strongroom._native",
            ["native/guarded.c", "native/auditline.c", "native/keyops.c"],
            depends=["native/auditline.h", "native/keyops.h"],
            # the system libcrypto (libssl-dev): SHA-256 for the audit log's hot path, and
            # the vault's EC/RSA key operations
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
        )
    ]
)
