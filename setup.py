"""Builds the guarded-memory extension; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "strongroom._native",
            ["native/guarded.c", "native/auditline.c"],
            depends=["native/auditline.h"],
            libraries=["crypto"],  # SHA-256 for the audit log's hot path (libssl-dev)
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fstack-protector-strong"],
        )
    ]
)
