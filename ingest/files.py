"""File checks that need no PDF library: existence, size, the %PDF- header, the content hash.
The main process uses them before it hands a file to the extraction workers (ingest.workers)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import BadDocument


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_pdf_file(path: str | os.PathLike) -> None:
    """Raise BadDocument when ``path`` is no file, is empty or has no ``%PDF-`` header in its
    first kB (what can be said without parsing it)."""
    p = Path(path)
    if not p.is_file():
        raise BadDocument(f"{p.name}: no such file")
    if p.stat().st_size == 0:
        raise BadDocument(f"{p.name}: empty file (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(1024)
    if b"%PDF-" not in head:
        raise BadDocument(f"{p.name}: not a PDF (no %PDF- header); only PDF files can be ingested")
