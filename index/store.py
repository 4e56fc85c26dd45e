"""Chroma store: a CLIP-space collection (figures, pages), a passage collection (text chunks and
figure texts) and a small registry of documents. Local (PersistentClient) or server (HttpClient),
one code path. It takes and returns the typed records of ``index.records``; no caller sees
Chroma. Every vector collection records the model that filled it; a vector query or write with
another model is refused (ModelMismatch) until ``mmrag reindex``. Collections are opened on first
use, and reads that need no vectors (listing, removing) never ask which model is configured, so
they work without the model's weights."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import hugepages
from .errors import ModelMismatch, StorageFault, explain_storage_error
from .records import (DocRecord, Filter, TextItem, VisualItem, doc_from_chroma, doc_to_meta, text_from_chroma,
                      visual_from_chroma)
from .scan import ExactScan, Mirror
from .settings import DEFAULT_EF_SEARCH, DEFAULT_EXACT_SCAN, ChromaSettings

# a collection of up to this many items has its exact scan read inside its first query (~2 s at
# 20,000 here, docs/BENCHMARKS.md): no answer then depends on when a background read ended
SYNC_SCAN_ROWS = 20_000
SYNC_SCAN_WAIT_S = 60.0  # a read slower than this (a loaded machine): HNSW answers meanwhile

VISUAL = "mmrag_visual"
TEXT = "mmrag_text"
DOCS = "mmrag_docs"
NAMES = {"visual": VISUAL, "text": TEXT}
BATCH = 1000
_FROM = {"visual": visual_from_chroma, "text": text_from_chroma}


@dataclass(frozen=True)
class Match:
    item: VisualItem | TextItem | None  # None: not read (a query with ``records=False``)
    score: float  # cosine similarity
    key: str = ""  # the item's id when ``item`` is None

    @property
    def id(self) -> str:
        return self.key if self.item is None else self.item.id


def make_client(chroma: ChromaSettings, data_dir: str | Path):
    """Chroma client: embedded (``mode: local``, in ``chroma.path`` or DATA_DIR/chroma) or a server."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if chroma.mode == "local":
        path = Path(chroma.path or Path(data_dir) / "chroma")
        db = path / "chroma.sqlite3"
        if db.exists() and db.stat().st_size == 0:  # Chroma would silently start an empty library in it
            images = sum(1 for _ in (Path(data_dir) / "images").glob("*/*"))
            raise StorageFault(f"the index database {db} is empty (0 bytes) while {images} image file(s) remain: it "
                               f"was emptied or truncated. Restore {path} from a backup, or move {path} and "
                               f"{Path(data_dir) / 'images'} away and ingest the PDFs again", "emptied")
        if path.exists() and not os.access(path, os.W_OK):
            return _read_only_snapshot(path, settings, explain_storage_error(OSError(30, "Read-only file system"),
                                                                             data_dir))
        try:
            path.mkdir(parents=True, exist_ok=True)
            return chromadb.PersistentClient(path=str(path), settings=settings)
        except Exception as exc:
            fault = explain_storage_error(exc, data_dir)
            if fault is None:
                raise
            if fault.kind == "full":  # Chroma writes as it opens: read a copy elsewhere, refuse writes
                try:
                    return _read_only_snapshot(path, settings, fault)
                except Exception:
                    pass
            raise fault from None
    return chromadb.HttpClient(host=chroma.host, port=chroma.port, ssl=chroma.ssl, headers=dict(chroma.headers),
                               settings=settings)


def fresh_local_client(client):
    """A new embedded client on the same path with its own caches. The embedded Chroma keeps
    HNSW indexes in memory and never sees another process's writes; a new system reads the files
    again. The old system is dropped from Chroma's shared cache, not stopped (clients that still
    name the path move to the new one)."""
    import chromadb
    from chromadb.api.shared_system_client import SharedSystemClient

    settings = client.get_settings()
    SharedSystemClient._identifier_to_system.pop(client._identifier, None)
    SharedSystemClient._identifier_to_refcount.pop(client._identifier, None)
    return chromadb.PersistentClient(path=settings.persist_directory, settings=settings)


def _read_only_snapshot(path: Path, settings, why: StorageFault):
    """An index that cannot be written (data dir on a read-only mount or without write
    permission, or its disk full): embedded Chroma cannot open a database it may not write, so
    reads go to a private copy of it in a temporary folder (deleted at exit). The client carries
    ``why`` as ``mmrag_read_only``; the store refuses writes with it (``Store.read_only``)."""
    import atexit
    import logging
    import shutil
    import tempfile

    import chromadb

    logging.getLogger(__name__).warning("%s cannot be written (%s): reading a snapshot copy of the index; "
                                        "changes are refused", path, why.kind)
    tmp = Path(tempfile.mkdtemp(prefix="mmrag-readonly-"))
    atexit.register(shutil.rmtree, tmp, True)
    shutil.copytree(path, tmp / "chroma")
    client = chromadb.PersistentClient(path=str(tmp / "chroma"), settings=settings)
    client.mmrag_read_only = why
    return client


class Store:
    """``visual_identity`` / ``text_identity``: the configured models' identities, or functions
    that compute them (called only when a vector collection is first used). ``check=False`` skips
    the model guard (``mmrag reindex``). ``ef_search``: HNSW search breadth, applied to existing
    collections too.

    ``generation``: a small file every writer bumps (``bump``) when it takes the write lock and
    after each committed change (ingest, remove, reindex swap); when another process moved it,
    the next read re-opens the collections (``refresh``, on a fresh client for the embedded mode),
    so each process sees the others' writes and a reindex's swap without a restart. None: no
    other process writes (no check).

    The embedded (local) mode keeps the list of complete documents (``list_docs()``, a Chroma
    read of ~7 ms with 500 documents that every search makes) until this store writes the
    registry or another process moves the generation, as the collections' in-memory indexes do;
    other statuses (recovery's) are always read, and so is everything from a server (it may be
    shared by processes that do not share the generation file). Queries may run from several
    threads. In the embedded mode, a collection's first vector query also moves the process's
    large loaded memory (its HNSW index) to 2 MB pages, in the background (``_huge_pages``).

    ``exact_scan``: ``auto`` searches a collection of more than ``ef_search`` items in the
    embedded mode with an exact in-memory scan (``index/scan.py``) instead of HNSW, which is
    approximate there; the scan is read in the background on the first such query (HNSW answers
    until it is ready) and kept in step with every write (this store's own, another process's
    seen through the generation file, a reindex's swap). ``off``: HNSW only. A collection of up to
    ``SYNC_SCAN_ROWS`` items is read inside that first query instead (under ~2 s), so its answers
    never depend on timing. ``read_scans=False`` (a one-shot command answering one question) never
    starts a read: HNSW answers, with no background read to pay for and wait for at exit."""

    def __init__(self, client, visual_identity: str | Callable[[], str], text_identity: str | Callable[[], str],
                 check: bool = True, ef_search: int = DEFAULT_EF_SEARCH,
                 generation: str | os.PathLike | None = None, exact_scan: str = DEFAULT_EXACT_SCAN,
                 read_scans: bool = True):
        if exact_scan not in ("auto", "off"):
            raise ValueError(f"exact_scan should be auto or off, not {exact_scan!r}")
        self.client = client
        self.exact_scan = exact_scan
        self.read_scans = read_scans
        self.check = check
        self.ef_search = ef_search
        self._identity = {"visual": visual_identity, "text": text_identity}
        self._checked: dict[str, object] = {}  # which -> collection opened for vectors (model checked)
        self.generation_file = Path(generation) if generation else None
        # a StorageFault when the index can only be read (a snapshot of a read-only or full one)
        self.read_only: StorageFault | None = getattr(client, "mmrag_read_only", None)
        self._lock = threading.RLock()  # refresh, and the document lists below
        self._complete: list[DocRecord] | None = None  # list_docs() while nothing changed
        self._docs_version = 0  # moves at every registry change this store makes or sees
        self._local = bool(client.get_settings().is_persistent)  # embedded: the indexes live in this process
        self._cache_docs = self._local
        self._paged: set[int] = set()  # ids of the collections whose loaded index got huge pages
        # exact scans (exact_scan: auto), and each vector collection's size as last counted
        self._mirrors = {which: Mirror(which, lambda which=which: self._vectors(which)) for which in NAMES}
        self._counts: dict[str, tuple[object, int]] = {}
        self._seen = self._stamp()
        self._resume_swaps()
        self.docs = client.get_or_create_collection(DOCS, embedding_function=None)

    # ---- several processes, one library ------------------------------------------------------
    def _stamp(self):
        if self.generation_file is None:
            return None
        try:
            st = os.stat(self.generation_file)
            return st.st_ino, st.st_mtime_ns, st.st_size
        except FileNotFoundError:
            return None

    def refresh(self) -> bool:
        """Re-open the collections if another process committed a change since we last looked
        (the generation file moved). One stat when nothing changed. Returns whether it re-opened."""
        stamp = self._stamp()
        if stamp == self._seen or self.read_only:
            return False
        with self._lock:
            if self._stamp() == self._seen:  # another thread re-opened meanwhile
                return False
            stamp = self._stamp()
            if self.client.get_settings().is_persistent:
                self.client = fresh_local_client(self.client)
            self._checked = {}
            self._paged.clear()  # the re-opened collections load their indexes anew (new objects, maybe old ids)
            self._docs_changed()
            self._counts.clear()
            for mirror in self._mirrors.values():  # the scans catch up before they answer again
                mirror.changed()
            for attempt in range(50):  # a reindex in another process may be between delete and rename
                try:
                    self.docs = self.client.get_collection(DOCS, embedding_function=None)
                    break
                except Exception:
                    if attempt == 49:
                        raise
                    time.sleep(0.1)
            self._seen = stamp
        return True

    def bump(self) -> None:
        """Tell other processes the index changed (called by the writer, under its lock)."""
        if self.generation_file is None:
            return
        try:
            n = int(self.generation_file.read_text() or 0)
        except (FileNotFoundError, ValueError):
            n = 0
        tmp = self.generation_file.with_name(f".{self.generation_file.name}.{os.getpid()}")
        tmp.write_text(str(n + 1))
        os.replace(tmp, self.generation_file)
        self._seen = self._stamp()
        self._docs_changed()

    # ---- collections -------------------------------------------------------------------------
    def identity(self, which: str) -> str:
        value = self._identity[which]
        return value() if callable(value) else value

    def _vectors(self, which: str):
        """The collection for vector work: created if missing, its model checked."""
        self.refresh()
        with self._lock:  # the client and its collections as one pair: refresh() swaps both
            client, checked = self.client, self._checked
        col = checked.get(which)
        if col is not None:
            return col
        name, identity = NAMES[which], self.identity(which)
        col = self._breadth(client.get_or_create_collection(
            name, metadata={"mmrag:model": identity}, configuration=self._hnsw(), embedding_function=None))
        stored = (col.metadata or {}).get("mmrag:model")
        if stored != identity and self.check:
            if col.count() > 0:
                raise ModelMismatch(
                    f"the index collection '{name}' was filled with {stored} but the config now asks for "
                    f"{identity}; mixing models gives meaningless results. Run `mmrag reindex` to re-embed "
                    f"the stored images and texts with the configured model, or restore the old model in config.yaml.")
            col.modify(metadata={**(col.metadata or {}), "mmrag:model": identity})  # empty: now it is ours
        with self._lock:
            if checked is self._checked:  # not when a refresh re-opened meanwhile: its client is newer
                checked[which] = col
        return col

    def _plain(self, which: str):
        """The collection for reads and deletes that need no model, or None when there is none yet."""
        from chromadb.errors import NotFoundError

        self.refresh()
        col = self._checked.get(which)
        if col is not None:
            return col
        try:
            return self._breadth(self.client.get_collection(NAMES[which], embedding_function=None))
        except NotFoundError:
            return None

    def _breadth(self, col):
        """``col`` searching with our ``ef_search`` (an index made before has another). Set before
        anything reads the collection: the process loads its HNSW index on the first read (a
        count, a get) with the breadth stored then, and keeps it for later queries."""
        if (col.configuration_json.get("hnsw") or {}).get("ef_search") != self.ef_search:
            col.modify(configuration={"hnsw": {"ef_search": self.ef_search}})
        return col

    @property
    def visual(self):
        """The raw visual collection (benchmarks compare against it); prefer the methods."""
        return self._vectors("visual")

    @property
    def text(self):
        return self._vectors("text")

    def check_models(self) -> None:
        """Raise ModelMismatch now if either vector collection was filled with another model."""
        self._vectors("visual")
        self._vectors("text")

    def _hnsw(self) -> dict:
        # ef_search >= the collection size makes HNSW search exhaustive: exact, repeatable results
        return {"hnsw": {"space": "cosine", "ef_search": self.ef_search}}

    # ---- document registry -------------------------------------------------------------------
    def set_doc(self, sha: str, **fields) -> None:
        """Create or update a document's registry record with DocRecord fields."""
        self.refresh()
        got = self.docs.get(ids=[sha], include=["metadatas"])
        old = dict(got["metadatas"][0]) if got["ids"] else {}
        old.update(doc_to_meta(fields))
        try:
            self.docs.upsert(ids=[sha], embeddings=[[1.0]], metadatas=[old])
        finally:
            self._docs_changed()

    def get_doc(self, sha: str) -> DocRecord | None:
        self.refresh()
        got = self.docs.get(ids=[sha], include=["metadatas"])
        return doc_from_chroma(sha, got["metadatas"][0]) if got["ids"] else None

    def list_docs(self, status: str | None = "complete") -> list[DocRecord]:
        """Documents by name; ``status=None`` lists pending ones too."""
        self.refresh()
        keep = self._cache_docs and status == "complete"
        with self._lock:
            known, version = (self._complete if keep else None), self._docs_version
        if known is not None:
            return list(known)
        got = self.docs.get(include=["metadatas"], where={"status": status} if status else None)
        docs = sorted((doc_from_chroma(i, m) for i, m in zip(got["ids"], got["metadatas"])), key=lambda d: d.doc)
        if keep:
            with self._lock:
                if version == self._docs_version:  # nothing changed while we read
                    self._complete = docs
        return list(docs)

    def _docs_changed(self) -> None:
        """Forget the document lists (after a registry write, or on seeing another process's)."""
        with self._lock:
            self._docs_version += 1
            self._complete = None

    def set_docs(self, changes: dict[str, dict]) -> None:
        """Update several registry records (DocRecord fields) in one write, one Chroma upsert: a
        replacement flips the new version to complete and the old one to removing together."""
        self.refresh()
        shas = list(changes)
        got = self.docs.get(ids=shas, include=["metadatas"])
        old = {i: dict(m) for i, m in zip(got["ids"], got["metadatas"])}
        metas = [{**old.get(sha, {}), **doc_to_meta(changes[sha])} for sha in shas]
        try:
            self.docs.upsert(ids=shas, embeddings=[[1.0]] * len(shas), metadatas=metas)
        finally:
            self._docs_changed()

    def delete_items(self, sha: str) -> None:
        """Remove a document's items; its record stays (a crash midway leaves it to retry)."""
        for which in NAMES:
            col = self._plain(which)
            if col is not None:
                try:
                    col.delete(where={"doc_sha": sha})
                finally:
                    self._wrote(which, lambda scan: scan.drop_doc(sha))

    def delete_visual(self, ids: Sequence[str]) -> None:
        """Remove figures/pages by id (``mmrag doctor --repair`` drops those whose image is gone)."""
        col = self._plain("visual")
        if col is not None and ids:
            try:
                for i in range(0, len(ids), BATCH):
                    col.delete(ids=list(ids[i:i + BATCH]))
            finally:
                self._wrote("visual", lambda scan: scan.drop(ids))

    def delete_records(self, shas: Sequence[str]) -> None:
        if shas:
            try:
                self.docs.delete(ids=list(shas))
            finally:
                self._docs_changed()

    def delete_doc(self, sha: str) -> None:
        """Remove a document's items, then its record (so a crash midway leaves a record to retry)."""
        self.delete_items(sha)
        self.delete_records([sha])

    # ---- writing -----------------------------------------------------------------------------
    @staticmethod
    def add_to(col, items: Sequence[VisualItem | TextItem], vectors: np.ndarray) -> None:
        """Upsert items with their vectors (row i of ``vectors`` is item i) into a collection."""
        rows = [it.to_chroma() for it in items]
        for i in range(0, len(rows), BATCH):
            ids, metas, docs = zip(*rows[i:i + BATCH])
            col.upsert(ids=list(ids), embeddings=vectors[i:i + BATCH].tolist(), metadatas=list(metas),
                       documents=list(docs))

    def add_visual(self, items: Sequence[VisualItem], vectors: np.ndarray) -> None:
        self._add("visual", items, vectors)

    def add_text(self, items: Sequence[TextItem], vectors: np.ndarray) -> None:
        self._add("text", items, vectors)

    def _add(self, which: str, items, vectors: np.ndarray) -> None:
        col = self._vectors(which)
        try:
            self.add_to(col, items, vectors)
        finally:  # even a failed write may have stored some batches: the scan takes them all (a
            # rollback deletes them by document)
            rows = [it.to_chroma() for it in items]
            self._wrote(which, lambda scan: scan.add([r[0] for r in rows], [r[1] for r in rows], vectors))

    def _wrote(self, which: str, change) -> None:
        """This store changed collection ``which``: its exact scan (if any) follows."""
        self._counts.pop(which, None)
        self._mirrors[which].apply(change)

    # ---- vector queries ----------------------------------------------------------------------
    @staticmethod
    def _query(col, which: str, vector: np.ndarray, n: int, where: dict | None) -> list[Match]:
        if n <= 0:
            return []
        # an ndarray, not a list: Chroma validates a list float by float (4 vs 7 ms per query at 20k)
        got = col.query(query_embeddings=[np.asarray(vector, np.float32)], n_results=n, where=where,
                        include=["metadatas", "distances", "documents"])
        make = _FROM[which]
        # an item another process deleted may linger without metadata in a stale in-memory index
        # until the next refresh: leave it out rather than fail
        return [Match(make(i, m, doc), 1.0 - float(d)) for i, d, m, doc in
                zip(got["ids"][0], got["distances"][0], got["metadatas"][0], got["documents"][0]) if m is not None]

    def _nearest(self, which: str, vector, n: int, flt: Filter | None, records: bool = True) -> list[Match]:
        """Top ``n`` items the filter accepts, nearest first: from the exact scan where it is on
        and ready (``_exact``), otherwise from Chroma's HNSW index. Chroma's ``where`` pre-filter scans
        metadata (851 ms vs 10 ms unfiltered at 100k vectors, docs/BENCHMARKS.md), and the filter
        rarely excludes anything, so: the unfiltered nearest n, filtered here; then the nearest 3n
        when some were dropped (fetching metadata is most of a query's cost, so no oversampling up
        front); the exact filtered query only when fewer than n survive that and the collection
        has more to give."""
        col = self._vectors(which)
        try:
            scan = self._exact(which, col)
            if scan is not None:
                return self._scan_query(col, which, scan, vector, n, flt, records)
            return self._nearest_in(col, which, vector, n, flt)
        finally:
            self._huge_pages(col)

    def _exact(self, which: str, col) -> ExactScan | None:
        """The collection's exact scan when it should answer and is ready: ``exact_scan: auto``,
        the embedded mode, and more items than ``ef_search`` (HNSW with ef >= count is exact
        already, and its answers stay byte for byte what they were). Starts reading it in the
        background when it is not ready."""
        if self.exact_scan == "off" or not self._local:
            return None
        known = self._counts.get(which)
        if known is None or known[0] is not col:
            known = self._counts[which] = (col, col.count())
        if known[1] <= self.ef_search:
            return None
        mirror = self._mirrors[which]
        scan = mirror.ready()
        if scan is None and self.read_scans:
            mirror.start()
            if known[1] <= SYNC_SCAN_ROWS:  # read it now: answers that do not depend on timing
                mirror.wait(SYNC_SCAN_WAIT_S)
                scan = mirror.ready()
        return scan

    def read_scans_now(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Start reading the exact scan of every collection that uses one (``exact_scan: auto``,
        embedded mode, more items than ``ef_search``), instead of at its first query: a server
        warms them at start, ``mmrag eval`` waits so that every question gets the same search.
        Returns True when every such scan is ready (always, with ``wait=False``)."""
        for which in NAMES:
            if self.exact_scan == "off" or not self._local or self._plain(which) is None:
                continue
            col = self._vectors(which)
            if col.count() > self.ef_search:
                self._mirrors[which].start()
        return self.wait_for_scans(timeout) if wait else True

    def _scan_query(self, col, which: str, scan: ExactScan, vector, n: int, flt: Filter | None,
                    records: bool = True) -> list[Match]:
        """The exact nearest ``n`` from the scan, with their records read by id (one Chroma get:
        ~3 ms for 50 ids at 100k items) unless ``records`` is False."""
        if flt is not None and flt.nothing(which):
            return []
        hits = scan.nearest(vector, n, flt)
        if not hits or not records:
            return [Match(None, score, i) for i, score in hits]
        got = col.get(ids=[i for i, _ in hits], include=["metadatas", "documents"])
        records = {i: (m, d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"]) if m is not None}
        make = _FROM[which]
        # an item another process deleted since the scan caught up is left out, as from a stale HNSW index
        return [Match(make(i, *records[i]), score) for i, score in hits if i in records]

    def scan_status(self) -> dict[str, dict]:
        """Per vector collection: whether its exact scan is ready, its rows, its arrays' MB, the
        seconds its first full read took (None before) and its queries the int8 first pass
        narrowed (``answered``) or left to the full product (``too_many_candidates``)."""
        out = {}
        for which, mirror in self._mirrors.items():
            scan = mirror.scan
            out[which] = {"ready": mirror.ready() is not None, "rows": len(scan) if scan else 0,
                          "mb": round(scan.nbytes / 1e6, 1) if scan else 0.0, "build_s": mirror.build_s,
                          "first_pass": dict(scan.first_pass) if scan else {}}
        return out

    def wait_for_scans(self, timeout: float | None = None) -> bool:
        """Wait for the exact scans being read or catching up; True when every started one is ready."""
        return all(m.settled(timeout) for m in self._mirrors.values())

    def _nearest_in(self, col, which: str, vector, n: int, flt: Filter | None) -> list[Match]:
        if flt is None:
            return self._query(col, which, vector, n, None)
        if flt.nothing(which):
            return []
        for size in (n, 3 * n):
            got = self._query(col, which, vector, size, None)
            kept = [m for m in got if flt.accepts(m.item)]
            if len(kept) >= n or len(got) < size:
                return kept[:n]
        return self._query(col, which, vector, n, flt.where(which))

    def _huge_pages(self, col) -> None:
        """After a collection's first vector query here (Chroma has loaded its HNSW index into
        this process's memory then), back the large resident memory with 2 MB pages, in the
        background (``index/hugepages.py``: the CLIP-space query at 100k items 17.7 instead of 19.5 ms
        p50 inside retrieval, same results).
        Embedded mode only: a server keeps its indexes in its own process."""
        if self._local and id(col) not in self._paged:
            self._paged.add(id(col))
            hugepages.collapse_in_background()

    def query_visual(self, vector, n: int, flt: Filter | None = None, records: bool = True) -> list[Match]:
        """The ``n`` figures/pages nearest to a CLIP vector that ``flt`` accepts, nearest first.
        ``records=False``: a match may come without its item (``item`` None, ``key`` its id) where
        reading it would cost a Chroma read (the exact scan answered); ``get_visual`` reads the
        ones needed later (retrieval: those that survive fusion, ~3 ms fewer per question at 100k)."""
        return self._nearest("visual", vector, n, flt, records)

    def query_text(self, vector, n: int, flt: Filter | None = None) -> list[Match]:
        """The ``n`` passages nearest to a passage vector that ``flt`` accepts, nearest first."""
        return self._nearest("text", vector, n, flt)

    # ---- reads -------------------------------------------------------------------------------
    def _get(self, which: str, flt: Filter | None, include: list[str], ids: list[str] | None = None):
        col = self._plain(which)
        if col is None or (flt is not None and flt.nothing(which)):
            return None
        return col.get(ids=ids, where=flt.where(which) if flt else None, include=include)

    def get_visual(self, ids: list[str]) -> list[VisualItem]:
        """The stored figures/pages with these ids (missing ones left out)."""
        got = self._get("visual", None, ["metadatas", "documents"], ids) if ids else None
        if not got:
            return []
        return [visual_from_chroma(i, m, d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"])]

    def visual_items(self, flt: Filter | None = None) -> list[VisualItem]:
        got = self._get("visual", flt, ["metadatas", "documents"])
        if not got:
            return []
        return [visual_from_chroma(i, m, d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"])]

    def visual_vectors(self, flt: Filter | None = None) -> tuple[list[VisualItem], np.ndarray]:
        """Figures/pages with their CLIP vectors (row i belongs to item i)."""
        got = self._get("visual", flt, ["metadatas", "embeddings"])
        if not got or not len(got["ids"]):
            return [], np.zeros((0, 0), np.float32)
        items = [visual_from_chroma(i, m, None) for i, m in zip(got["ids"], got["metadatas"])]
        return items, np.asarray(got["embeddings"], np.float32)

    def text_items(self, flt: Filter | None = None) -> list[TextItem]:
        got = self._get("text", flt, ["metadatas", "documents"])
        if not got:
            return []
        return [text_from_chroma(i, m, d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"])]

    def count(self, which: str) -> int:
        col = self._plain(which)
        return col.count() if col is not None else 0

    def get_text(self, ids: list[str]) -> list[TextItem]:
        """The stored passages with these ids (missing ones left out), in no particular order."""
        got = self._get("text", None, ["metadatas", "documents"], ids) if ids else None
        if not got:
            return []
        return [text_from_chroma(i, m, d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"])]

    def page_image(self, doc: str, page: int) -> str | None:
        """Image path (relative to data_dir) of the stored render of page ``page`` of the document
        named ``doc``."""
        col = self._plain("visual")
        if col is None:
            return None
        got = col.get(where={"$and": [{"doc": doc}, {"page": page}, {"kind": "page"}]}, include=["metadatas"], limit=1)
        return visual_from_chroma(got["ids"][0], got["metadatas"][0], None).image if got["ids"] else None

    def iter_items(self, which: str) -> Iterable[list[VisualItem | TextItem]]:
        """Every stored item of ``visual`` or ``text``, in batches."""
        col = self._plain(which)
        total, offset = (col.count() if col is not None else 0), 0
        while offset < total:
            got = col.get(include=["documents", "metadatas"], limit=BATCH, offset=offset)
            yield [_FROM[which](i, m, d) for i, m, d in zip(got["ids"], got["metadatas"], got["documents"])]
            offset += BATCH

    def image_paths(self) -> set[str]:
        """Every image file (relative path) a stored item refers to."""
        col = self._plain("visual")
        total, offset, refs = (col.count() if col is not None else 0), 0, set()
        while offset < total:
            got = col.get(include=["metadatas"], limit=BATCH, offset=offset)
            refs.update(m.get("image", "") for m in got["metadatas"])
            offset += BATCH
        return refs

    # ---- reindex -----------------------------------------------------------------------------
    def start_replacement(self, which: str, identity: str):
        """An empty collection for a new model, filled (``add_to``) beside the live one (see
        ``finish_replacement``)."""
        name = NAMES[which] + "_next"
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
        self._swap(NAMES[which])
        self._checked.pop(which, None)
        self._counts.pop(which, None)
        self._mirrors[which].replaced()  # a new collection: its scan is read again

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


def now() -> float:
    return round(time.time(), 3)
