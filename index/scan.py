"""Exact nearest-neighbour search over a vector collection held in memory, for large libraries.

Above ``chroma.ef_search`` items Chroma's HNSW search is approximate: at 100,000 random vectors
(ef 2000) it returns ~70 % of the true nearest 50, in ~18 ms. A plain scan (one float32
matrix-vector product over every stored vector, then a partial sort) takes ~11 ms at 100,000 ×
512 and is exact. It needs the vectors in this process, and reading them back from Chroma takes
seconds (~15 s at 100,000), so it is built once, in the background, and then kept in step with
every write (``Mirror``): this process's writes are applied to it as they happen; another
process's (seen when the generation file moves) are found by comparing the stored ids with the
scan's, and a replaced collection (``mmrag reindex``) is read again.

Memory: the unit vectors (float32: 2 kB per 512-d item, 1.5 kB per 384-d one, i.e. ~205 MB
and ~154 MB per 100,000 items) plus the ids and a few small codes per row. Chroma's records
(metadata, text) are not kept: the store fetches the chosen ids' records with one ``get``.

Scores are Chroma's for its ``cosine`` space: 1 − (1 − cos) with the distance in float32.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from .records import Filter, stands_for

log = logging.getLogger(__name__)

PAGE = 2000  # rows per Chroma read while building (~0.4 s at 100k; embeddings come back as float64)
FETCH = 1000  # ids per Chroma read while catching up with another process's writes

# A process that exits while a thread is inside a Chroma read crashes (SIGSEGV: the interpreter
# goes away under Chroma's Rust code), e.g. a one-shot `mmrag ask` that started a scan: at exit
# the reading threads are told to stop after their current read, and waited for.
_STOP = threading.Event()
_THREADS: list[threading.Thread] = []
_AT_EXIT = threading.Lock()


class _Stopped(Exception):
    pass


def _stop_readers() -> None:
    _STOP.set()
    for thread in list(_THREADS):
        thread.join(60)


def _watch(thread: threading.Thread) -> None:
    """Stop and join ``thread`` at exit (``atexit`` hooks run before the interpreter tears down
    the modules Chroma's code in that thread still uses)."""
    with _AT_EXIT:
        if not _THREADS:
            atexit.register(_stop_readers)
        _THREADS[:] = [t for t in _THREADS if t.is_alive()] + [thread]


def release_freed_memory() -> None:
    """Hand the heap memory a large read freed back to the system (glibc's ``malloc_trim(0)``).
    A full read leaves glibc holding what Chroma's pages (float64 embeddings, metadata dicts)
    took: ~111 MB at 100,000 items that the process keeps but never uses again. Does nothing
    where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def _check_stop() -> None:
    if _STOP.is_set():
        raise _Stopped


def unit_rows(vectors) -> np.ndarray:
    """Rows scaled to length 1, as float32 (a zero row stays zero): what Chroma's cosine space
    compares.

    >>> unit_rows([[3.0, 4.0], [0.0, 0.0]]).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    v = np.array(vectors, dtype=np.float32, ndmin=2)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0).astype(np.float32)


def top_rows(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest scores, largest first; equal scores in row order. ``-inf``
    marks a row that may not be returned.

    >>> top_rows(np.array([0.1, 0.9, 0.5, 0.9, -np.inf], np.float32), 3).tolist()
    [1, 3, 2]
    >>> top_rows(np.array([0.1, -np.inf], np.float32), 5).tolist()
    [0]
    """
    n = min(n, int(np.count_nonzero(scores > -np.inf)))
    if n <= 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-scores, n - 1)[:n] if n < len(scores) else np.arange(len(scores))
    # ties at the cut-off: every row scoring the n-th best competes, so the row order decides
    cut = scores[part].min()
    part = np.union1d(part, np.flatnonzero(scores == cut)) if np.count_nonzero(scores == cut) > 1 else part
    order = np.lexsort((part, -scores[part].astype(np.float64)))
    return part[order][:n]


def chroma_scores(dots: np.ndarray) -> list[float]:
    """Similarities as the store reports Chroma's answers: ``1 - distance``, the cosine distance
    computed in float32.

    >>> chroma_scores(np.array([1.0, 0.25], np.float32))
    [1.0, 0.25]
    """
    return [1.0 - float(d) for d in (np.float32(1.0) - np.asarray(dots, np.float32))]


def row_fields(which: str, meta: dict) -> tuple[str, str, str, int]:
    """What ``Filter`` tests of a stored item, from its Chroma metadata: (doc_sha, kind, label,
    page), where kind is what the item is or stands for (a figure passage: its figure's kind, by
    ``records.stands_for``, the rule ``TextItem.stands_for`` uses) and label is the zero-shot
    label of a visual item ("" for text).

    >>> row_fields("visual", {"doc_sha": "s", "kind": "vector", "label": "chart", "page": 3})
    ('s', 'vector', 'chart', 3)
    >>> row_fields("text", {"doc_sha": "s", "kind": "figure_text", "source": "raster", "page": 2})
    ('s', 'raster', '', 2)
    >>> row_fields("text", {"doc_sha": "s", "kind": "text", "source": "ocr", "page": 2})
    ('s', 'text', '', 2)
    """
    if which == "visual":
        return meta["doc_sha"], meta["kind"], meta.get("label") or "", int(meta["page"])
    return meta["doc_sha"], stands_for(meta["kind"], meta.get("source")), "", int(meta["page"])


class _Codes:
    """Strings as small integer codes (a growing table)."""

    def __init__(self):
        self.of: dict[str, int] = {}

    def code(self, value: str) -> int:
        got = self.of.get(value)
        if got is None:
            got = self.of[value] = len(self.of)
        return got

    def lookup(self, values: Iterable[str]) -> np.ndarray:
        """A boolean table over the codes: True for the given values."""
        table = np.zeros(len(self.of) + 1, bool)
        table[[self.of[v] for v in values if v in self.of]] = True
        return table


class ExactScan:
    """The rows of one collection (``which``: ``visual`` or ``text``) as arrays: ids, the unit
    vectors (float32, ``dim`` wide), and the fields a ``Filter`` tests (document, kind, label,
    page) as codes. ``collection_id``: the Chroma collection it mirrors (a reindex replaces it).
    Safe across threads (one lock; a query holds it for its matrix product)."""

    def __init__(self, which: str, dim: int, collection_id: str = "", capacity: int = 1024):
        self.which, self.dim, self.collection_id = which, dim, collection_id
        self._lock = threading.Lock()
        self.ids: list[str | None] = []
        self.row_of: dict[str, int] = {}
        self._docs, self._kinds, self._labels = _Codes(), _Codes(), _Codes()
        cap = max(capacity, 16)
        self.vectors = np.zeros((cap, dim), np.float32)
        self.doc = np.zeros(cap, np.int32)
        self.kind = np.zeros(cap, np.int16)
        self.label = np.zeros(cap, np.int16)
        self.page = np.zeros(cap, np.int32)
        self.alive = np.zeros(cap, bool)
        self._mask: tuple | None = None  # (filter, version, accepted rows) of the last query

        self.version = 0

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (the ids and their index not counted)."""
        return sum(a.nbytes for a in (self.vectors, self.doc, self.kind, self.label, self.page, self.alive))

    # ---- writes ---------------------------------------------------------------------------------
    def add(self, ids: Sequence[str], metas: Sequence[dict], vectors) -> None:
        """Insert or replace rows (``metas``: the items' Chroma metadata, ``vectors``: one row
        each, any length: scaled to 1 here)."""
        if not len(ids):
            return
        vecs = unit_rows(vectors)
        if vecs.shape[1] != self.dim:
            raise ValueError(f"vectors of {vecs.shape[1]} dimensions for a scan of {self.dim}")
        fields = [row_fields(self.which, m) for m in metas]
        with self._lock:
            rows = np.empty(len(ids), np.int64)
            for k, i in enumerate(ids):
                r = self.row_of.get(i)
                if r is None:
                    r = self.row_of[i] = len(self.ids)
                    self.ids.append(i)
                rows[k] = r
            self._grow(len(self.ids))
            self.vectors[rows] = vecs
            self.doc[rows] = [self._docs.code(f[0]) for f in fields]
            self.kind[rows] = [self._kinds.code(f[1]) for f in fields]
            self.label[rows] = [self._labels.code(f[2]) for f in fields]
            self.page[rows] = [f[3] for f in fields]
            self.alive[rows] = True
            self.version += 1

    def drop(self, ids: Iterable[str]) -> int:
        """Remove rows by id (unknown ones ignored); returns how many went."""
        with self._lock:
            rows = [self.row_of.pop(i) for i in ids if i in self.row_of]
            for r in rows:
                self.ids[r] = None
            self.alive[rows] = False
            self.version += 1
            self._compact()
        return len(rows)

    def drop_doc(self, sha: str) -> int:
        """Remove every row of a document; returns how many went."""
        with self._lock:
            code = self._docs.of.get(sha)
            if code is None:
                return 0
            size = len(self.ids)
            ids = [self.ids[r] for r in np.flatnonzero(self.alive[:size] & (self.doc[:size] == code))]
        return self.drop(ids)  # by id: a compaction in between moves rows, not ids

    def _grow(self, size: int) -> None:
        cap = len(self.alive)
        if size <= cap:
            return
        cap = max(size, cap + cap // 4)  # a quarter more: the vectors are most of the memory
        for name in ("vectors", "doc", "kind", "label", "page", "alive"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def _compact(self) -> None:
        """Drop dead rows once they are a quarter of the table (under the lock)."""
        size = len(self.ids)
        dead = size - len(self.row_of)
        if dead < 1024 or dead * 4 < size:
            return
        keep = np.flatnonzero(self.alive[:size])
        for name in ("vectors", "doc", "kind", "label", "page", "alive"):
            old = getattr(self, name)
            new = np.zeros((max(len(keep), 16), *old.shape[1:]), old.dtype)
            new[:len(keep)] = old[keep]
            setattr(self, name, new)
        self.ids = [self.ids[r] for r in keep]
        self.row_of = {i: r for r, i in enumerate(self.ids)}

    # ---- queries --------------------------------------------------------------------------------
    def _accepted(self, flt: Filter | None, size: int) -> tuple[np.ndarray, bool]:
        """Rows ``flt`` accepts (alive ones), as a boolean array, and whether that is every row
        (under the lock; the last filter's answer is kept until the rows change)."""
        if self._mask is not None and self._mask[0] == flt and self._mask[1] == self.version:
            return self._mask[2:]
        keep = self.alive[:size].copy()
        if flt is not None:
            if flt.documents is not None:
                keep &= self._docs.lookup(flt.documents)[self.doc[:size]]
            if flt.page is not None:
                keep &= self.page[:size] == flt.page
            if flt.kinds is not None:
                keep &= self._kinds.lookup(flt.kinds)[self.kind[:size]]
            if self.which == "visual" and flt.labels is not None:
                keep &= self._labels.lookup(flt.labels)[self.label[:size]]
        self._mask = (flt, self.version, keep, bool(keep.all()))
        return self._mask[2:]

    def ids_now(self) -> set[str]:
        with self._lock:
            return set(self.row_of)

    def nearest(self, vector, n: int, flt: Filter | None = None) -> list[tuple[str, float]]:
        """The ``n`` rows nearest to ``vector`` (cosine) among those ``flt`` accepts, nearest
        first, as (id, score) with Chroma's score (``chroma_scores``). Exact: every row is
        compared."""
        q = unit_rows(vector)[0]
        if q.shape[0] != self.dim:
            raise ValueError(f"a query of {q.shape[0]} dimensions for a scan of {self.dim}")
        with self._lock:
            size = len(self.ids)
            if n <= 0 or not self.row_of:
                return []
            # numpy's own loop, one thread: OpenBLAS's sgemv (``@``) took 16 vs 8.4 ms alone at
            # 100k x 512, and 40 vs 14.7 ms with the passage scan beside it (its threads contend)
            dots = np.einsum("ij,j->i", self.vectors[:size], q)
            keep, everything = self._accepted(flt, size)
            if not everything:
                dots[~keep] = -np.inf
            rows = top_rows(dots, n)
            return list(zip([self.ids[r] for r in rows], chroma_scores(dots[rows])))


def read_rows(col, which: str, scan: ExactScan, ids: Sequence[str] | None = None,
              progress: Callable[[int], None] | None = None) -> int:
    """Add rows read from Chroma collection ``col`` to ``scan``: those with these ``ids`` (in
    reads of ``FETCH``), or every row (in pages of ``PAGE``). Returns how many were read."""
    done = 0
    if ids is not None:
        ids = list(ids)
        for i in range(0, len(ids), FETCH):
            _check_stop()
            got = col.get(ids=ids[i:i + FETCH], include=["embeddings", "metadatas"])
            scan.add(got["ids"], got["metadatas"], got["embeddings"])
            done += len(got["ids"])
        return done
    offset = 0
    while True:
        _check_stop()
        got = col.get(include=["embeddings", "metadatas"], limit=PAGE, offset=offset)
        if not len(got["ids"]):
            return done
        scan.add(got["ids"], got["metadatas"], got["embeddings"])
        done += len(got["ids"])
        offset += len(got["ids"])
        if progress:
            progress(done)


class Mirror:
    """One collection's ``ExactScan``, kept in step with it for one store. ``open_collection``
    returns the collection as the store sees it now (after its ``refresh``).

    Versions: every change this store makes or sees moves ``version``; the scan answers queries
    only when it has caught up with the latest one (``ready``). This store's own writes are
    applied to the scan as they happen (``apply``); another process's (``changed``) and a
    replaced collection (``replaced``) leave it behind until the background thread (``start``)
    has read the difference, or everything again."""

    def __init__(self, which: str, open_collection: Callable[[], object]):
        self.which = which
        self._open = open_collection
        self._lock = threading.Lock()
        self.scan: ExactScan | None = None
        self.version = 0
        self.synced = -1
        self.failed: int | None = None  # the version a catch-up failed at (not retried until the next change)
        self._thread: threading.Thread | None = None
        self.build_s: float | None = None  # the first full read's seconds
        self.built = threading.Event()  # set once the scan first became ready

    def ready(self) -> ExactScan | None:
        with self._lock:
            return self.scan if self.scan is not None and self.synced == self.version else None

    def changed(self) -> None:
        """Another process wrote: the scan must catch up before it answers again."""
        with self._lock:
            self.version += 1

    def replaced(self) -> None:
        """The collection was replaced (reindex): read it again."""
        with self._lock:
            self.version += 1
            self.scan = None

    def apply(self, change: Callable[[ExactScan], object]) -> None:
        """This store's own write, applied to the scan (still ready if it was)."""
        with self._lock:
            was_ready = self.scan is not None and self.synced == self.version
            self.version += 1
            if self.scan is not None:
                try:
                    change(self.scan)
                except Exception as exc:  # not expected: read it again rather than answer wrong
                    log.warning("exact scan of the %s collection: %s; reading it again", self.which, exc)
                    self.scan = None
                    return
                if was_ready:
                    self.synced = self.version

    def start(self) -> None:
        """Build or catch up in a background thread, unless one runs or the last try at this
        version failed."""
        with self._lock:
            if (self._thread is not None and self._thread.is_alive()) or self.failed == self.version or \
                    (self.scan is not None and self.synced == self.version):
                return
            if _STOP.is_set():
                return
            self._thread = threading.Thread(target=self._run, name=f"mmrag-scan-{self.which}", daemon=True)
            _watch(self._thread)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a running build or catch-up is over (at most ``timeout`` seconds; None:
        no limit); True when the scan is ready."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.ready() is not None

    def settled(self, timeout: float | None = None) -> bool:
        """Like ``wait``, but a scan that was never started counts as settled: True when the
        scan is ready or no build was ever started (nothing to wait for); False when a read is
        still running after ``timeout`` seconds, or failed."""
        if self.wait(timeout):
            return True
        with self._lock:
            return self.scan is None and self._thread is None

    def _run(self) -> None:
        while True:
            with self._lock:
                version, scan = self.version, self.scan
            try:
                col = self._open()
                if scan is None or scan.collection_id != str(col.id):
                    scan = self._build(col)
                else:
                    self._catch_up(col, scan)
            except _Stopped:  # the process is exiting
                return
            except Exception as exc:  # the collection went away meanwhile, a read failed: HNSW goes on
                log.warning("exact scan of the %s collection: %s; searching with HNSW", self.which, exc)
                with self._lock:
                    self.failed = version
                return
            with self._lock:
                # a replaced collection (reindex) or rows written meanwhile: the next pass sees them
                self.scan = scan
                if self.version == version:
                    self.synced = version
                    self.built.set()
                    return

    def _build(self, col) -> ExactScan:
        total = col.count()
        _check_stop()
        t0 = time.perf_counter()
        first = col.get(include=["embeddings"], limit=1)
        dim = len(first["embeddings"][0]) if len(first["ids"]) else 0
        log.info("exact scan of the %s collection: reading %d vectors (once per process)", self.which, total)
        scan = ExactScan(self.which, dim, str(col.id), capacity=total + PAGE)

        def progress(done: int) -> None:
            if done % 50_000 < PAGE:
                log.info("exact scan of the %s collection: %d of %d vectors read", self.which, done, total)

        read_rows(col, self.which, scan, progress=progress)
        self._catch_up(col, scan)  # rows written while the pages were read (offsets shift)
        release_freed_memory()
        self.build_s = round(time.perf_counter() - t0, 1)
        log.info("exact scan of the %s collection: %d vectors in %.1f s, %.0f MB", self.which, len(scan),
                 self.build_s, scan.nbytes / 1e6)
        return scan

    def _catch_up(self, col, scan: ExactScan) -> None:
        """Make the scan's rows the collection's: drop the ids it no longer has, read the new ones."""
        _check_stop()
        stored = set(col.get(include=[])["ids"])
        have = scan.ids_now()
        gone = have - stored
        if gone:
            scan.drop(gone)
        new = stored - have
        if new:
            read_rows(col, self.which, scan, sorted(new))
