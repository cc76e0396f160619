"""SHA-256 digests of bytes and files: what saved guides, run records and the SmolLM2 cache record of what they wrote.

A low-level module (nothing of pyro_lora below it), so that the file layers, :mod:`pyro_lora.model_files` under
:mod:`pyro_lora.io`, hash the same way.
"""

from __future__ import annotations

import hashlib

__all__ = ["bytes_sha256", "file_sha256"]


def bytes_sha256(data: bytes) -> str:
    """The SHA-256 of ``data``, as 64 hex digits."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(file) -> str:
    """The SHA-256 of the file at ``file`` (a path), as 64 hex digits, read in chunks: never held whole in memory
    beside the tensors it holds."""
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
