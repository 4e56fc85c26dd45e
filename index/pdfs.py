"""The original PDFs, content-addressed: ``pdfs/<sha256>.pdf`` in the data dir, one file per
document (a document's id is its file's sha256). Written atomically (temp file, then rename);
the library deletes a document's PDF with its items, and ``sweep`` removes files no document
record names (a crash between writing the file and registering the document, stray temp files).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

SHA = re.compile(r"[0-9a-f]{64}")


def is_sha(value: str) -> bool:
    """True for a full lowercase sha256 in hex, the only name a stored PDF can have.

    >>> is_sha("a" * 64), is_sha("../" + "a" * 61), is_sha("A" * 64)
    (True, False, False)
    """
    return isinstance(value, str) and SHA.fullmatch(value) is not None


class PdfStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.dir = self.root / "pdfs"

    def path(self, sha: str) -> Path:
        """Where the PDF with this sha256 is (or would be) kept. ValueError for anything but a
        full sha256, so no caller can name a file outside ``pdfs/``."""
        if not is_sha(sha):
            raise ValueError(f"not a document sha256: {sha[:80]!r}")
        return self.dir / f"{sha}.pdf"

    def has(self, sha: str) -> bool:
        return is_sha(sha) and self.path(sha).is_file()

    def put(self, src: str | os.PathLike, sha: str) -> Path:
        """Copy ``src`` in as ``pdfs/<sha>.pdf`` (temp file, fsync, rename); nothing to do when it
        is there already. ValueError when the bytes copied do not hash to ``sha`` (the file
        changed since it was hashed): nothing is kept then. OSError (disk full...) leaves no temp
        file behind."""
        dest = self.path(sha)
        if dest.is_file():
            return dest
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{sha}.pdf.tmp{os.getpid()}")
        try:
            h = hashlib.sha256()
            with open(src, "rb") as f, open(tmp, "wb") as out:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != sha:
                raise ValueError(f"{Path(src).name} changed while it was being ingested; ingest it again")
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    def delete(self, shas: Iterable[str]) -> None:
        for sha in shas:
            if is_sha(sha):
                self.path(sha).unlink(missing_ok=True)

    def shas(self) -> set[str]:
        """The shas of the PDFs kept."""
        if not self.dir.is_dir():
            return set()
        return {p.name[:-4] for p in self.dir.iterdir() if p.name.endswith(".pdf") and is_sha(p.name[:-4])}

    def sweep(self, keep: set[str]) -> int:
        """Delete kept PDFs whose sha is not in ``keep``, and temp files; returns how many."""
        if not self.dir.is_dir():
            return 0
        removed = 0
        for p in self.dir.iterdir():
            sha = p.name[:-4] if p.name.endswith(".pdf") else ""
            if sha in keep and is_sha(sha):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
        return removed
