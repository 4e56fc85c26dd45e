"""Figure descriptions, kept once: a small SQLite table in the data dir keyed by the figure image's
content hash (the sha256 that names its file in ``images/``) and the describing model. A copy of a
document, a re-ingest, ``mmrag reindex`` and a restart find them here instead of paying the model
again; each description is committed as soon as it arrives, so an interrupted run loses none.

SQLite (standard library) rather than a Chroma collection: descriptions are looked up by exact
key, need no vector, and must survive the re-embedding that ``reindex`` does to the collections.
Safe across threads and processes (one short connection per call, WAL journal).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """CREATE TABLE IF NOT EXISTS descriptions (
    image_sha TEXT NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    PRIMARY KEY (image_sha, model))"""


def image_sha(image: str) -> str:
    """The content hash of a stored image from its relative path (``images/ab/<sha>.png``).

    >>> image_sha("images/ab/ab12cd.png")
    'ab12cd'
    """
    return Path(image).stem


@dataclass(frozen=True)
class StoredDescription:
    image_sha: str
    model: str
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class DescriptionStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.unavailable = False  # a read-only data dir: no descriptions to read, none written
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute(SCHEMA)
        except (OSError, sqlite3.OperationalError) as exc:  # a read-only or full disk: reads go on without
            logging.getLogger(__name__).warning("figure descriptions unavailable (%s: %s)", self.path, exc)
            self.unavailable = True

    @contextmanager
    def _connect(self):
        con = sqlite3.connect(self.path, timeout=30)
        try:
            with con:  # commits, or rolls back on an error
                yield con
        finally:
            con.close()

    def get(self, image_sha: str, model: str) -> StoredDescription | None:
        return self.get_many([image_sha], model).get(image_sha)

    def get_many(self, shas: list[str], model: str) -> dict[str, StoredDescription]:
        """Stored descriptions by image hash (those not described by ``model`` are absent)."""
        out: dict[str, StoredDescription] = {}
        if self.unavailable:
            return out
        shas = list(dict.fromkeys(shas))
        with self._connect() as con:
            for i in range(0, len(shas), 500):
                part = shas[i:i + 500]
                rows = con.execute(f"SELECT image_sha, model, text, prompt_tokens, completion_tokens FROM descriptions "
                                   f"WHERE model = ? AND image_sha IN ({','.join('?' * len(part))})", [model, *part])
                out.update((r[0], StoredDescription(*r)) for r in rows)
        return out

    def put(self, d: StoredDescription) -> None:
        """Keep a description (committed before returning); a second one for the same key replaces it."""
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO descriptions VALUES (?, ?, ?, ?, ?, ?)",
                        (d.image_sha, d.model, d.text, d.prompt_tokens, d.completion_tokens, time.time()))

    def count(self, model: str | None = None) -> int:
        if self.unavailable:
            return 0
        with self._connect() as con:
            if model is None:
                return con.execute("SELECT count(*) FROM descriptions").fetchone()[0]
            return con.execute("SELECT count(*) FROM descriptions WHERE model = ?", (model,)).fetchone()[0]
