"""Content-addressed image files: ``images/ab/abcdef….png``; written atomically, stored once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class ImageStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def put(self, data: bytes, ext: str = "png") -> str:
        """Store bytes; returns the path relative to the data dir, e.g. ``images/ab/ab12….png``."""
        sha = hashlib.sha256(data).hexdigest()
        rel = Path("images") / sha[:2] / f"{sha}.{ext}"
        path = self.root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(rel)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def sweep(self, referenced: set[str]) -> int:
        """Delete image files no stored item refers to (and stray temp files); returns how many."""
        removed = 0
        base = self.root / "images"
        if not base.exists():
            return 0
        for path in base.glob("*/*"):
            rel = str(path.relative_to(self.root))
            if rel not in referenced:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
