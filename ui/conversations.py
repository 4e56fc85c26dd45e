"""Chat conversations kept on disk for the web UI: one SQLite file in ``data_dir``
(``conversations.sqlite3``), one row per conversation, each owned by one user (the signed-in user
name when login is on, a random browser id otherwise). Every read and write names the owner, so
nobody sees or deletes another owner's conversations.

SQLite (Python's standard library) rather than Chroma: conversations are small documents read and
written whole, not vectors; a single file survives restarts and needs no server.

A conversation is a plain dict: ``{"id", "title", "created", "updated", "messages": [...],
"citations": {key: {...}}}``; messages are dicts the UI writes (``ui.app`` gives their shape).

>>> import tempfile, pathlib
>>> store = ConversationStore(pathlib.Path(tempfile.mkdtemp()) / "c.sqlite3")
>>> conv = store.create("ada")
>>> conv["messages"].append({"role": "user", "kind": "question", "text": "What is fig. 2?"})
>>> store.save("ada", conv)
>>> [c["title"] for c in store.list("ada")], store.list("bob")
(['What is fig. 2?'], [])
>>> store.load("bob", conv["id"]) is None, store.delete("bob", conv["id"]), store.delete("ada", conv["id"])
(True, False, True)
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

TITLE_CHARS = 60


def title_of(messages: list[dict]) -> str:
    """A conversation's title: its first question, on one line, at most 60 characters.

    >>> title_of([{"role": "user", "kind": "question", "text": "How are\\nnodes laid out?"}])
    'How are nodes laid out?'
    >>> title_of([]), len(title_of([{"role": "user", "kind": "question", "text": "x" * 99}]))
    ('New chat', 60)
    """
    for m in messages:
        if m.get("role") == "user" and m.get("kind") == "question" and m.get("text", "").strip():
            text = " ".join(m["text"].split())
            return text if len(text) <= TITLE_CHARS else text[:TITLE_CHARS - 1] + "…"
    return "New chat"


class ConversationStore:
    """Conversations per owner in one SQLite file; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                         "title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, body TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS by_owner ON conversations (owner, updated)")

    @staticmethod
    def new() -> dict:
        """An empty conversation (not stored until saved)."""
        now = time.time()
        return {"id": uuid.uuid4().hex, "title": "New chat", "created": now, "updated": now, "messages": [],
                "citations": {}}

    def create(self, owner: str) -> dict:
        conv = self.new()
        self.save(owner, conv)
        return conv

    def save(self, owner: str, conv: dict) -> None:
        """Write a conversation whole (its title follows its first question). A conversation id
        owned by someone else is left alone."""
        conv["title"] = title_of(conv["messages"])
        conv["updated"] = time.time()
        body = json.dumps({"messages": conv["messages"], "citations": conv.get("citations", {})})
        with self._lock:
            self._db.execute("INSERT INTO conversations (id, owner, title, created, updated, body) "
                             "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET title=excluded.title, "
                             "updated=excluded.updated, body=excluded.body WHERE conversations.owner=excluded.owner",
                             (conv["id"], owner, conv["title"], conv.get("created", conv["updated"]),
                              conv["updated"], body))

    def load(self, owner: str, conv_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT id, title, created, updated, body FROM conversations "
                                   "WHERE id=? AND owner=?", (conv_id, owner)).fetchone()
        if row is None:
            return None
        body = json.loads(row[4])
        return {"id": row[0], "title": row[1], "created": row[2], "updated": row[3],
                "messages": body.get("messages", []), "citations": body.get("citations", {})}

    def list(self, owner: str) -> list[dict]:
        """The owner's conversations, most recently updated first: id, title, updated (unix time)."""
        with self._lock:
            rows = self._db.execute("SELECT id, title, updated FROM conversations WHERE owner=? "
                                    "ORDER BY updated DESC", (owner,)).fetchall()
        return [{"id": r[0], "title": r[1], "updated": r[2]} for r in rows]

    def delete(self, owner: str, conv_id: str) -> bool:
        """True when the owner had that conversation (it is gone now)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM conversations WHERE id=? AND owner=?", (conv_id, owner))
        return cur.rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
