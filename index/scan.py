"""Exact nearest-neighbour search over a vector collection held in memory, for large libraries.

Above ``chroma.ef_search`` items Chroma's HNSW search is approximate: at 100,000 random vectors
(ef 2000) it returns ~70 % of the true nearest 50, in ~18 ms. A plain scan (one float32
matrix-vector product over every stored vector, then a partial sort) takes ~11 ms at 100,000 ×
512 and is exact. It needs the vectors in this process, and reading them back from Chroma takes
seconds (~15 s at 100,000), so it is built once, in the background, and then kept in step with
every write (``Mirror``): this process's writes are applied to it as they happen; another
process's (seen when the generation file moves) are found by comparing the stored ids with the
scan's, and a replaced collection (``mmrag reindex``) is read again.

A query reads an int8 copy of the rows first (a quarter of the bytes; the product is
memory-bound): every row's score to within a proven bound, then the float32 product of only the
rows that can be among the nearest n (``ExactScan._candidates``): the same answer, ~2.5x faster
at 100,000 rows (~4 vs ~10 ms at 512-d).

Memory: the unit vectors (float32: 2 kB per 512-d item, 1.5 kB per 384-d one, i.e. ~205 MB
and ~154 MB per 100,000 items), their int8 copy (a quarter of that) plus the ids and a few small
codes per row. Chroma's records (metadata, text) are not kept: the store fetches the chosen ids'
records with one ``get``.

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


# ---- the int8 first pass ----------------------------------------------------------------------
# At 100,000 rows the float32 product is memory-bound (~205 MB read per 512-d question, ~9 ms at
# the ~23 GB/s this machine's cores share). A copy of the rows in int8 (a quarter of the bytes),
# multiplied by ONNX Runtime's MatMulInteger (~2.5 ms at 100,000 x 512), gives each row's score
# to within a bound that holds for every row; only rows whose bound reaches the n-th best lower
# bound can be among the nearest n, and only those are scored again in float32. The answer is
# the float32 scan's.
COARSE_MIN_ROWS = 4096  # below this the float32 product is a fraction of a millisecond
COARSE_MAX_SHARE = 8  # more candidates than 1/8 of the rows (near-tied scores): the float32 product


def int8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row of ``x`` (float32, rows × d) as int8 codes with its own scale:
    ``x[r] ≈ scale[r] * codes[r]``. Returns (codes int8 rows × d, scale float32, ``resid``
    (the error's length ``‖x[r] − scale[r]·codes[r]‖``) and ``size`` (``‖scale[r]·codes[r]‖``),
    both float32 rounded up, so that for any q:
    ``|q·x[r] − scale[r]·(q·codes[r])| ≤ ‖q‖·resid[r]`` (Cauchy–Schwarz).

    >>> codes, scale, resid, size = int8_rows(np.array([[0.5, -0.25], [0.0, 0.0]], np.float32))
    >>> codes.tolist(), [round(float(v), 6) for v in scale], [round(float(v), 6) for v in resid], [round(float(v), 4) for v in size]
    ([[127, -64], [0, 0]], [0.003937, 1.0], [0.001969, 0.0], [0.5599, 0.0])
    """
    x = np.asarray(x, np.float32)
    top = np.abs(x).max(axis=1) if x.shape[1] else np.zeros(len(x), np.float32)
    scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    back = codes.astype(np.float64) * scale[:, None].astype(np.float64)
    resid = np.linalg.norm(x.astype(np.float64) - back, axis=1)
    size = np.linalg.norm(back, axis=1)
    up = np.float32(1 + 1e-6)
    return codes, scale, (resid.astype(np.float32) * up), (size.astype(np.float32) * up)


def candidate_rows(approx: np.ndarray, err: np.ndarray, n: int) -> np.ndarray:
    """Rows (ascending) that can be among the ``n`` best when row r's true score lies in
    ``approx[r] ± err[r]`` (``-inf`` in ``approx``: a row that may not be returned): every row
    whose upper bound reaches the n-th best lower bound. The n rows with the best lower bounds
    score at least that much, so a row below it cannot beat all of them.

    >>> candidate_rows(np.array([0.9, 0.5, 0.7, 0.1, -np.inf]), np.array([0.1, 0.1, 0.1, 0.1, 0.1]), 2).tolist()
    [0, 1, 2]
    """
    lower = approx - err
    live = int(np.count_nonzero(approx > -np.inf))
    if live <= n:
        return np.flatnonzero(approx > -np.inf)
    cut = np.partition(lower, len(lower) - n)[len(lower) - n]
    return np.flatnonzero(approx + err >= cut)


_SESSIONS: dict[int, object] = {}
_SESSIONS_LOCK = threading.Lock()
# the question's codes: ±63, sent as q + 64 (1..127). On x86 CPUs without VNNI (AVX2, AVX-512
# before Cascade Lake, AMD before Zen 4) ONNX Runtime's u8 x s8 kernels add two neighbouring byte
# products in 16 bits with saturation (vpmaddubsw): 2 * 127 * 127 = 32,258 fits, 2 * 255 * 127 would not
Q_LEVELS = 63


def exact_products(product, dim: int) -> bool:
    """Whether ``product`` (as ``_int8_product`` returns) gives the exact integer products on
    the inputs that would overflow a 16-bit pair sum: every query code at ±Q_LEVELS against
    every row code at ±127, same and alternating signs.

    >>> def saturating(q, codes, sums):  # a model of vpmaddubsw's 16-bit pair sums
    ...     pairs = ((q.astype(np.int64) + 64)[:, None] * codes).reshape(-1, 2, codes.shape[1]).sum(axis=1)
    ...     return np.clip(pairs, -32768, 32767).sum(axis=0) - 64 * sums
    >>> exact_products(saturating, 8)
    True
    >>> def wider(q, codes, sums):  # the same kernel sent q + 128 (the codes' range was ±127)
    ...     pairs = ((q.astype(np.int64) * 2 + 128)[:, None] * codes).reshape(-1, 2, codes.shape[1]).sum(axis=1)
    ...     return (np.clip(pairs, -32768, 32767).sum(axis=0) - 128 * sums) // 2
    >>> exact_products(wider, 8)
    False
    """
    signs = np.array([[1] * dim, [-1] * dim, [(-1) ** i for i in range(dim)]], np.int64)
    codes = np.ascontiguousarray((127 * signs).T).astype(np.int8)  # dim x 3 columns
    sums = codes.sum(axis=0, dtype=np.int32)
    for q in (Q_LEVELS * signs).astype(np.int8):
        want = q.astype(np.int64) @ codes.astype(np.int64)
        if not np.array_equal(np.asarray(product(q, codes, sums), np.int64), want):
            return False
    return True


def _int8_product(dim: int):
    """A function ``(q_codes int8 (dim,) within ±Q_LEVELS, codes int8 (dim × cols), sums int32
    (rows,)) -> int32 (rows,)``: the exact integer products of q with the first ``rows`` columns,
    whose code sums (over the ``dim`` codes of each column) are ``sums``, through ONNX Runtime's
    MatMulInteger (one thread: the other core searches the other collection); None when ONNX
    Runtime cannot build it or its products are not exact here (``exact_products``)."""
    with _SESSIONS_LOCK:
        if dim not in _SESSIONS:
            try:
                import onnxruntime as ort
                from onnx import TensorProto, helper

                # no zero point in the graph: with one, MatMulInteger took 10-13 ms instead of 2.5
                # at 512 x 102,000 (it goes another way); the shift is taken back with the code sums
                graph = helper.make_graph(
                    [helper.make_node("MatMulInteger", ["q", "codes"], ["dots"])], "int8_product",
                    [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, dim]),
                     helper.make_tensor_value_info("codes", TensorProto.INT8, [dim, "cols"])],
                    [helper.make_tensor_value_info("dots", TensorProto.INT32, [1, "cols"])])
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                model.ir_version = 8
                so = ort.SessionOptions()
                so.intra_op_num_threads = so.inter_op_num_threads = 1
                session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

                def product(q_codes: np.ndarray, codes: np.ndarray, sums: np.ndarray) -> np.ndarray:
                    # q as uint8 (MatMulInteger's u8 x s8): q + 64, so each product is 64 times
                    # the column's code sum too much
                    shifted = (q_codes.astype(np.int16) + (Q_LEVELS + 1)).astype(np.uint8)[None, :]
                    return session.run(None, {"q": shifted, "codes": codes})[0][0][:len(sums)] - (Q_LEVELS + 1) * sums

                if not exact_products(product, dim):
                    raise ValueError("ONNX Runtime's MatMulInteger is not exact on this CPU")
                _SESSIONS[dim] = product
            except Exception as exc:  # a missing or too old ONNX Runtime: the float32 product alone
                log.warning("exact scan: no int8 first pass (%s); every query reads the float32 rows", exc)
                _SESSIONS[dim] = None
        return _SESSIONS[dim]


_ROW_ARRAYS = ("vectors", "doc", "kind", "label", "page", "alive", "code_scale", "code_resid", "code_size", "code_sum")


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
        # the int8 first pass (``_candidates``): rows less ``center`` as int8 codes, one column
        # per row (the layout MatMulInteger reads fastest), made once the scan has COARSE_MIN_ROWS
        self.center: np.ndarray | None = None
        self.codes: np.ndarray | None = None
        self.code_scale = np.zeros(cap, np.float32)
        self.code_resid = np.zeros(cap, np.float32)
        self.code_size = np.zeros(cap, np.float32)
        self.code_sum = np.zeros(cap, np.int32)
        self.first_pass = {"answered": 0, "too_many_candidates": 0}  # queries the int8 pass narrowed / not
        self._mask: tuple | None = None  # (filter, version, accepted rows) of the last query

        self.version = 0

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays (the ids and their index not counted)."""
        return sum(getattr(self, name).nbytes for name in _ROW_ARRAYS) + (self.codes.nbytes if self.codes is not None else 0)

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
            if self.center is not None:
                self._encode(rows)
            elif len(self.row_of) >= COARSE_MIN_ROWS:
                size = len(self.ids)
                rows_now = self.vectors[:size][self.alive[:size]]
                finite = np.isfinite(rows_now).all(axis=1)
                self.center = rows_now[finite].mean(axis=0) if finite.any() else np.zeros(self.dim, np.float32)
                self.codes = np.zeros((self.dim, len(self.alive)), np.int8)
                self._encode(np.arange(size))
                _int8_product(self.dim)  # built now (while the scan is read), not in a first query
            self.version += 1

    def _encode(self, rows: np.ndarray) -> None:
        """The int8 codes of these rows (under the lock). Centred first: the nearest rows do
        not change when one vector is taken from every row, and embeddings that share a large
        common part (CLIP's do) quantise with far less error around their mean."""
        x = self.vectors[rows] - self.center
        # a NaN or infinite vector (NaN once scaled to length 1) scores NaN, which neither path
        # returns: coded as zeros, it keeps the others' bounds finite
        bad = ~np.isfinite(x).all(axis=1)
        codes, scale, resid, size = int8_rows(np.where(bad[:, None], np.float32(0), x))
        self.codes[:, rows] = codes.T
        self.code_scale[rows], self.code_resid[rows], self.code_size[rows] = scale, resid, size
        self.code_sum[rows] = codes.sum(axis=1, dtype=np.int32)

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
        for name in _ROW_ARRAYS:
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)
        if self.codes is not None:
            codes = np.zeros((self.dim, cap), np.int8)
            codes[:, :self.codes.shape[1]] = self.codes
            self.codes = codes

    def _compact(self) -> None:
        """Drop dead rows once they are a quarter of the table (under the lock)."""
        size = len(self.ids)
        dead = size - len(self.row_of)
        if dead < 1024 or dead * 4 < size:
            return
        keep = np.flatnonzero(self.alive[:size])
        for name in _ROW_ARRAYS:
            old = getattr(self, name)
            new = np.zeros((max(len(keep), 16), *old.shape[1:]), old.dtype)
            new[:len(keep)] = old[keep]
            setattr(self, name, new)
        if self.codes is not None:
            codes = np.zeros((self.dim, max(len(keep), 16)), np.int8)
            codes[:, :len(keep)] = self.codes[:, keep]
            self.codes = codes
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
            keep, everything = self._accepted(flt, size)
            rows = self._candidates(q, n, size, None if everything else keep)
            if rows is not None:  # the float32 product over the candidates only: the same scores
                dots = np.einsum("ij,j->i", self.vectors[rows], q)
                top = top_rows(dots, n)
                return list(zip([self.ids[r] for r in rows[top]], chroma_scores(dots[top])))
            # numpy's own loop, one thread: OpenBLAS's sgemv (``@``) took 16 vs 8.4 ms alone at
            # 100k x 512, and 40 vs 14.7 ms with the passage scan beside it (its threads contend)
            dots = np.einsum("ij,j->i", self.vectors[:size], q)
            if not everything:
                dots[~keep] = -np.inf
            rows = top_rows(dots, n)
            return list(zip([self.ids[r] for r in rows], chroma_scores(dots[rows])))

    def _candidates(self, q: np.ndarray, n: int, size: int, keep: np.ndarray | None) -> np.ndarray | None:
        """The rows (ascending) that can be among the float32 product's ``n`` best for the unit
        vector ``q`` among the rows ``keep`` accepts (None: all), from the int8 pass; None when
        there is no int8 copy or it narrows too little (then every row is read in float32).

        Bounds: row r's float32 score minus ``q·center`` lies within ``approx[r] ± err[r]``,
        where ``err`` is the quantisation bound of both sides (``int8_rows``) plus the float32
        product's own rounding (at most d·2⁻²⁴ for unit vectors, doubled) and the centring's."""
        if self.codes is None or size < COARSE_MIN_ROWS or n * COARSE_MAX_SHARE > size:
            return None
        product = _int8_product(self.dim)
        if product is None:
            return None
        if not np.isfinite(q).all():
            return None
        q64 = q.astype(np.float64)
        top = float(np.abs(q).max())
        q_scale = top / Q_LEVELS if top > 0 else 1.0
        q_codes = np.clip(np.rint(q64 / q_scale), -Q_LEVELS, Q_LEVELS).astype(np.int8)
        q_err = float(np.linalg.norm(q64 - q_codes * q_scale))
        # float32 from here: the int32 products are exact in it up to 2096-d (|dots| <= 63 · 127 · dim
        # < 2²⁴; above, a relative 2⁻²⁴), and
        # its rounding (~1e-7 on scores <= 1) is far inside the margin
        dots = product(q_codes, self.codes, self.code_sum[:size]).astype(np.float32)
        approx = dots * (self.code_scale[:size] * np.float32(q_scale))
        err = np.float32(np.linalg.norm(q64)) * self.code_resid[:size] + np.float32(q_err) * self.code_size[:size]
        err += np.float32(self.dim * 2.0 ** -23 + 1e-6)
        if keep is not None:
            approx[~keep] = -np.inf
        rows = candidate_rows(approx, err, n)
        if len(rows) * COARSE_MAX_SHARE > size:
            self.first_pass["too_many_candidates"] += 1
            return None
        self.first_pass["answered"] += 1
        return rows


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
