"""Chroma store: a CLIP-space collection (figures, pages), a passage collection (text chunks and
figure texts) and a small registry of documents. Local (PersistentClient) or server (HttpClient),
one code path. Every collection records the model that filled it; opening it with another
model is refused (ModelMismatch) until ``mmrag reindex``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelMismatch
from .settings import DEFAULT_EF_SEARCH, ChromaSettings

VISUAL = "mmrag_visual"
TEXT = "mmrag_text"
DOCS = "mmrag_docs"
BATCH = 1000


@dataclass(frozen=True)
class Match:
    id: str
    score: float  # cosine similarity
    metadata: dict
    document: str | None = None


def make_client(chroma: ChromaSettings, data_dir: str | Path):
    """Chroma client: embedded (``mode: local``, in ``chroma.path`` or DATA_DIR/chroma) or a server."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if chroma.mode == "local":
        path = chroma.path or str(Path(data_dir) / "chroma")
        Path(path).mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=path, settings=settings)
    return chromadb.HttpClient(host=chroma.host, port=chroma.port, ssl=chroma.ssl, headers=dict(chroma.headers),
                               settings=settings)


class Store:
    def __init__(self, client, visual_identity: str, text_identity: str, check: bool = True,
                 ef_search: int = DEFAULT_EF_SEARCH):
        self.client = client
        self.ef_search = ef_search
        self._resume_swaps()
        self.visual = self._collection(VISUAL, visual_identity, check)
        self.text = self._collection(TEXT, text_identity, check)
        self.docs = client.get_or_create_collection(DOCS, embedding_function=None)

    def _collection(self, name: str, identity: str, check: bool):
        col = self.client.get_or_create_collection(
            name, metadata={"mmrag:model": identity}, configuration=self._hnsw(), embedding_function=None)
        if (col.configuration_json.get("hnsw") or {}).get("ef_search") != self.ef_search:
            col.modify(configuration={"hnsw": {"ef_search": self.ef_search}})  # an index made before
        stored = (col.metadata or {}).get("mmrag:model")
        if check and stored != identity and col.count() > 0:
            raise ModelMismatch(
                f"the index collection '{name}' was filled with {stored} but the config now asks for "
                f"{identity}; mixing models gives meaningless results. Run `mmrag reindex` to re-embed "
                f"the stored images and texts with the configured model, or restore the old model in config.yaml.")
        return col

    def _hnsw(self) -> dict:
        # ef_search >= the collection size makes HNSW search exhaustive: exact, repeatable results
        return {"hnsw": {"space": "cosine", "ef_search": self.ef_search}}

    # ---- document registry -------------------------------------------------------------
    def set_doc(self, sha: str, **meta) -> None:
        old = self.get_doc(sha) or {}
        old.update(meta)
        self.docs.upsert(ids=[sha], embeddings=[[1.0]], metadatas=[old])

    def get_doc(self, sha: str) -> dict | None:
        got = self.docs.get(ids=[sha], include=["metadatas"])
        return dict(got["metadatas"][0]) if got["ids"] else None

    def list_docs(self, status: str | None = "complete") -> list[dict]:
        got = self.docs.get(include=["metadatas"], where={"status": status} if status else None)
        return sorted((dict(m, sha256=i) for i, m in zip(got["ids"], got["metadatas"])), key=lambda d: d["doc"])

    def delete_doc(self, sha: str) -> None:
        """Remove a document's items, then its record (so a crash midway leaves a record to retry)."""
        for col in (self.visual, self.text):
            col.delete(where={"doc_sha": sha})
        self.docs.delete(ids=[sha])

    # ---- items -------------------------------------------------------------------------
    @staticmethod
    def add_to(col, ids: list[str], vectors: np.ndarray, metadatas: list[dict], documents: list[str] | None):
        for i in range(0, len(ids), BATCH):
            col.upsert(ids=ids[i:i + BATCH], embeddings=vectors[i:i + BATCH].tolist(),
                       metadatas=metadatas[i:i + BATCH],
                       documents=documents[i:i + BATCH] if documents else None)

    def add_visual(self, ids, vectors, metadatas, documents=None) -> None:
        self.add_to(self.visual, ids, vectors, metadatas, documents)

    def add_text(self, ids, vectors, metadatas, documents) -> None:
        self.add_to(self.text, ids, vectors, metadatas, documents)

    @staticmethod
    def _query(col, vector: np.ndarray, n: int, where: dict | None) -> list[Match]:
        if n <= 0:
            return []
        # an ndarray, not a list: Chroma validates a list float by float (4 vs 7 ms per query at 20k)
        got = col.query(query_embeddings=[np.asarray(vector, np.float32)], n_results=n, where=where,
                        include=["metadatas", "distances", "documents"])
        return [Match(i, 1.0 - float(d), dict(m), doc) for i, d, m, doc in
                zip(got["ids"][0], got["distances"][0], got["metadatas"][0], got["documents"][0])]

    def _filtered(self, col, vector, n: int, where: dict | None, keep) -> list[Match]:
        """Top ``n`` matches that ``keep(metadata)`` accepts. Chroma's ``where`` pre-filter scans
        metadata (851 ms vs 10 ms unfiltered at 100k vectors, docs/BENCHMARKS.md), and the filter
        rarely excludes anything, so: the unfiltered nearest n, filtered here; then the nearest 3n
        when some were dropped (fetching metadata is most of a query's cost, so no oversampling up
        front); the exact filtered query only when fewer than n survive that and the collection
        has more to give."""
        if keep is None:
            return self._query(col, vector, n, where)
        for size in (n, 3 * n):
            got = self._query(col, vector, size, None)
            kept = [m for m in got if keep(m.metadata)]
            if len(kept) >= n or len(got) < size:
                return kept[:n]
        return self._query(col, vector, n, where)

    def query_visual(self, vector, n: int, where: dict | None = None, keep=None) -> list[Match]:
        return self._filtered(self.visual, vector, n, where, keep)

    def query_text(self, vector, n: int, where: dict | None = None, keep=None) -> list[Match]:
        return self._filtered(self.text, vector, n, where, keep)

    def get_visual(self, ids: list[str]) -> list[Match]:
        got = self.visual.get(ids=ids, include=["metadatas", "documents"])
        return [Match(i, 1.0, dict(m), d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"])]

    def get_text(self, ids: list[str]) -> list[Match]:
        """Stored text items by id (score 1.0), those found, in no particular order."""
        if not ids:
            return []
        got = self.text.get(ids=ids, include=["metadatas", "documents"])
        return [Match(i, 1.0, dict(m), d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"])]

    def page_image(self, doc: str, page: int) -> str | None:
        """Relative image path of a stored page render."""
        got = self.visual.get(where={"$and": [{"doc": doc}, {"page": page}, {"kind": "page"}]},
                              include=["metadatas"], limit=1)
        return got["metadatas"][0]["image"] if got["ids"] else None

    def visual_embeddings(self, where: dict | None = None) -> tuple[list[str], np.ndarray, list[dict]]:
        got = self.visual.get(where=where, include=["embeddings", "metadatas"])
        emb = np.asarray(got["embeddings"], np.float32) if len(got["ids"]) else np.zeros((0, 0), np.float32)
        return got["ids"], emb, [dict(m) for m in got["metadatas"]]

    def update_visual_metadata(self, ids: list[str], metadatas: list[dict]) -> None:
        for i in range(0, len(ids), BATCH):
            self.visual.update(ids=ids[i:i + BATCH], metadatas=metadatas[i:i + BATCH])

    def all_text(self, where: dict | None = None) -> tuple[list[str], list[str], list[dict]]:
        got = self.text.get(where=where, include=["documents", "metadatas"])
        return got["ids"], got["documents"], [dict(m) for m in got["metadatas"]]

    def iter_items(self, which: str) -> Iterable[tuple[list[str], list[str], list[dict]]]:
        col = self.visual if which == "visual" else self.text
        total, offset = col.count(), 0
        while offset < total:
            got = col.get(include=["documents", "metadatas"], limit=BATCH, offset=offset)
            yield got["ids"], got["documents"], [dict(m) for m in got["metadatas"]]
            offset += BATCH

    def start_replacement(self, which: str, identity: str):
        """An empty collection for a new model, filled beside the live one (see ``finish_replacement``)."""
        name = (VISUAL if which == "visual" else TEXT) + "_next"
        try:
            self.client.delete_collection(name)
        except Exception:
            pass
        return self.client.create_collection(name, metadata={"mmrag:model": identity, "mmrag:complete": False},
                                             configuration=self._hnsw(), embedding_function=None)

    def finish_replacement(self, which: str, new) -> None:
        """Mark the filled collection complete, then swap it in. A crash before the mark leaves the
        old index untouched; a crash after it is completed by the next open (``_resume_swaps``)."""
        new.modify(metadata={**(new.metadata or {}), "mmrag:complete": True})
        self._swap(VISUAL if which == "visual" else TEXT)
        setattr(self, which, self.client.get_collection(VISUAL if which == "visual" else TEXT, embedding_function=None))

    def _swap(self, name: str) -> None:
        nxt = self.client.get_collection(name + "_next", embedding_function=None)
        try:
            self.client.delete_collection(name)
        except Exception:
            pass
        meta = {k: v for k, v in (nxt.metadata or {}).items() if k != "mmrag:complete"}
        nxt.modify(name=name, metadata=meta)

    def _resume_swaps(self) -> None:
        names = {c.name if hasattr(c, "name") else c for c in self.client.list_collections()}
        for name in (VISUAL, TEXT):
            if name + "_next" in names:
                nxt = self.client.get_collection(name + "_next", embedding_function=None)
                if (nxt.metadata or {}).get("mmrag:complete"):
                    self._swap(name)
                else:
                    self.client.delete_collection(name + "_next")


def bbox_meta(bbox) -> str:
    return json.dumps([round(float(v), 1) for v in bbox]) if bbox else ""


def bbox_from_meta(value: str):
    return json.loads(value) if value else None


def now() -> float:
    return round(time.time(), 3)
