"""The exact scan (``chroma.exact_scan: auto``) on a real Chroma store whose HNSW search is made
approximate (``ef_search`` far below the collection size): its answers are numpy's brute force
under a filter, and stay so through this store's writes, another process's ingest and removal
(seen through the generation file) and a reindex's swap of the collection."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from index.records import Filter, TextItem, VisualItem
from index.store import Store

ROOT = Path(__file__).resolve().parent.parent
DIM, TDIM, N = 32, 24, 360
BIG, BIG_DIM = 1500, 64  # where HNSW at ef 8 is approximate for nearly every query
DOCS = ("a" * 64, "b" * 64, "c" * 64)


def visual(i: int, doc: str | None = None) -> VisualItem:
    kind = "page" if i % 3 == 0 else ("vector", "raster")[i % 2]
    return VisualItem(f"v{i}", doc or DOCS[i % 3], "d.pdf", 1 + i % 4, kind, f"images/{i}.png",
                      label="" if kind == "page" else ("chart", "photo")[i // 2 % 2])


def passage(i: int, doc: str | None = None) -> TextItem:
    figure = i % 4 == 0
    return TextItem(f"t{i}", doc or DOCS[i % 3], "d.pdf", 1 + i % 4, "figure_text" if figure else "text",
                    f"f-{i}" if figure else f"t{i}", f"passage {i}", source=("raster" if figure else "text"))


def open_store(path: Path, dim: int = DIM, **kw) -> Store:
    client = chromadb.PersistentClient(path=str(path / "chroma"), settings=Settings(anonymized_telemetry=False))
    return Store(client, f"test|{dim}", f"test-text|{TDIM}", ef_search=8, generation=path / "generation", **kw)


def brute_force(vecs: np.ndarray, items: list, q: np.ndarray, n: int, flt: Filter | None) -> list[str]:
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    order = np.argsort(-(unit @ (q / np.linalg.norm(q))), kind="stable")
    return [items[i].id for i in order if flt is None or flt.accepts(items[i])][:n]


def ready(store: Store, query) -> None:
    """A first query starts the scan's read (HNSW answers it); wait until it is ready."""
    query()
    assert store.wait_for_scans(60)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan")
    rng = np.random.default_rng(11)
    vecs = (rng.standard_normal((BIG, BIG_DIM)) * rng.uniform(0.5, 3, (BIG, 1))).astype(np.float32)  # not unit length
    tvecs = rng.standard_normal((N, TDIM)).astype(np.float32)
    store = open_store(path, BIG_DIM)
    items, texts = [visual(i) for i in range(BIG)], [passage(i) for i in range(N)]
    store.add_visual(items, vecs)
    store.add_text(texts, tvecs)
    store.set_docs({d: {"doc": d[:1] + ".pdf", "status": "complete"} for d in DOCS})
    queries = rng.standard_normal((15, BIG_DIM)).astype(np.float32)
    tqueries = rng.standard_normal((15, TDIM)).astype(np.float32)
    return path, store, vecs, items, tvecs, texts, queries, tqueries


# a filter that drops a document and a kind (and, on the visual side, a label)
VISUAL_FILTER = Filter.of(DOCS[1:], ["vector", "page"], ["chart", ""])
TEXT_FILTER = Filter.of(DOCS[:2], ["text"])


def test_the_scan_answers_the_exact_nearest_accepted_items_where_hnsw_does_not(library):
    path, store, vecs, items, tvecs, texts, queries, tqueries = library
    ready(store, lambda: (store.query_visual(queries[0], 5), store.query_text(tqueries[0], 5)))
    assert store.scan_status()["visual"]["rows"] == BIG and store.scan_status()["text"]["rows"] == N
    assert all(s["ready"] for s in store.scan_status().values())
    for flt in (None, VISUAL_FILTER):
        for q in queries:
            got = store.query_visual(q, 50, flt)
            assert [m.id for m in got] == brute_force(vecs, items, q, 50, flt)
            assert all(flt is None or flt.accepts(m.item) for m in got)
            assert got[0].item == items[int(got[0].id[1:])]  # the records come with them
    for flt in (None, TEXT_FILTER):
        for q in tqueries:
            assert [m.id for m in store.query_text(q, 20, flt)] == brute_force(tvecs, texts, q, 20, flt)
    # the scores are Chroma's: 1 - cosine distance
    raw = store.visual.query(query_embeddings=[queries[0]], n_results=BIG, include=["distances"])
    chroma = dict(zip(raw["ids"][0], raw["distances"][0]))
    assert all(abs(m.score - (1 - chroma[m.id])) < 1e-6 for m in store.query_visual(queries[0], 20))

    # the same store searched by HNSW alone misses some: this test can fail (unfiltered: a
    # filtered query can end in Chroma's where-filtered search, which is exact over few items)
    hnsw = open_store(path, BIG_DIM, exact_scan="off")
    exact = sum([m.id for m in hnsw.query_visual(q, 50)] == brute_force(vecs, items, q, 50, None)
                for q in queries)
    assert exact < len(queries) / 2
    assert hnsw.scan_status()["visual"]["rows"] == 0


def test_a_first_query_is_already_exact_and_a_one_shot_process_reads_nothing(library):
    """A collection under SYNC_SCAN_ROWS is read inside its first query, so even that one is
    exact (no answer depends on when a background read ended); a one-shot store (``mmrag
    search``/``ask``) never starts a read, and ``read_scans_now`` (server start, ``mmrag eval``)
    reads every scan before any query."""
    path, _, vecs, items, tvecs, texts, queries, tqueries = library
    first = open_store(path, BIG_DIM)  # another process opening the library
    assert [m.id for m in first.query_visual(queries[1], 50)] == brute_force(vecs, items, queries[1], 50, None)
    assert [m.id for m in first.query_text(tqueries[1], 20)] == brute_force(tvecs, texts, tqueries[1], 20, None)

    one_shot = open_store(path, BIG_DIM, read_scans=False)
    hnsw = open_store(path, BIG_DIM, exact_scan="off")
    for q in queries[:5]:
        assert [m.id for m in one_shot.query_visual(q, 50)] == [m.id for m in hnsw.query_visual(q, 50)]
    assert one_shot.wait_for_scans(1)
    assert one_shot.scan_status()["visual"]["rows"] == 0 and one_shot.scan_status()["text"]["rows"] == 0

    warm = open_store(path, BIG_DIM)
    assert warm.read_scans_now(timeout=60)
    assert {w: (s["ready"], s["rows"]) for w, s in warm.scan_status().items()} == {"visual": (True, BIG), "text": (True, N)}


def test_a_collection_hnsw_searches_exhaustively_gets_no_scan(tmp_path):
    """Up to ef_search items HNSW is exact already and its answers stay as they were."""
    store = Store(chromadb.PersistentClient(path=str(tmp_path), settings=Settings(anonymized_telemetry=False)),
                  f"test|{DIM}", "t|8", ef_search=N)
    store.add_visual([visual(i) for i in range(N)], np.random.default_rng(0).standard_normal((N, DIM)))
    store.query_visual(np.ones(DIM), 5)
    store.wait_for_scans(10)
    assert store.scan_status()["visual"]["rows"] == 0


OTHER_PROCESS = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from tests.test_scan import DOCS, open_store, passage, visual
    path, step = Path(sys.argv[1]), sys.argv[2]
    store = open_store(path)
    rng = np.random.default_rng(5)
    if step == "ingest":  # a new document, and a passage added to a complete one (a figure description)
        store.bump()
        store.add_visual([visual(1000 + i, "d" * 64) for i in range(40)], rng.standard_normal((40, 32)))
        store.add_text([passage(1000 + i, "d" * 64) for i in range(40)], rng.standard_normal((40, 24)))
        store.add_text([passage(2000, DOCS[1])], rng.standard_normal((1, 24)))
        store.set_docs({"d" * 64: {"doc": "d.pdf", "status": "complete"}})
    else:  # remove document a
        store.bump()
        store.set_doc(DOCS[0], status="removing")
        store.delete_doc(DOCS[0])
    store.bump()
""")


def other_process(path: Path, step: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", OTHER_PROCESS, str(path), step], check=True, cwd=ROOT, env=env, timeout=120)


def test_the_scan_follows_this_store_another_process_and_a_reindex(tmp_path):
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((N, DIM)).astype(np.float32)
    tvecs = rng.standard_normal((N, TDIM)).astype(np.float32)
    store = open_store(tmp_path)
    items, texts = [visual(i) for i in range(N)], [passage(i) for i in range(N)]
    store.add_visual(items, vecs)
    store.add_text(texts, tvecs)
    store.set_docs({d: {"doc": d[:1] + ".pdf", "status": "complete"} for d in DOCS})
    store.bump()
    q, tq = rng.standard_normal(DIM).astype(np.float32), rng.standard_normal(TDIM).astype(np.float32)
    ready(store, lambda: (store.query_visual(q, 5), store.query_text(tq, 5)))

    def check(vecs, items, tvecs, texts):
        for n in (10, N + 100):  # the nearest few, and everything there is
            assert [m.id for m in store.query_visual(q, n)] == brute_force(vecs, items, q, n, None)
            assert [m.id for m in store.query_text(tq, n)] == brute_force(tvecs, texts, tq, n, None)

    # this store's own writes: applied at once, the scan stays ready
    more = rng.standard_normal((30, DIM)).astype(np.float32)
    store.add_visual([visual(500 + i) for i in range(30)], more)
    vecs, items = np.concatenate([vecs, more]), items + [visual(500 + i) for i in range(30)]
    assert store.scan_status()["visual"]["ready"]
    check(vecs, items, tvecs, texts)
    store.delete_visual(["v500", "v501"])
    vecs, items = np.concatenate([vecs[:N], vecs[N + 2:]]), items[:N] + items[N + 2:]
    check(vecs, items, tvecs, texts)

    # another process ingests a document and adds a passage to a complete one
    other_process(tmp_path, "ingest")
    store.query_visual(q, 5), store.query_text(tq, 5)  # sees the generation move: HNSW answers while the scan catches up
    assert store.wait_for_scans(60)
    orng = np.random.default_rng(5)
    vecs = np.concatenate([vecs, orng.standard_normal((40, DIM)).astype(np.float32)])
    items = items + [visual(1000 + i, "d" * 64) for i in range(40)]
    tvecs = np.concatenate([tvecs, orng.standard_normal((41, TDIM)).astype(np.float32)])
    texts = texts + [passage(1000 + i, "d" * 64) for i in range(40)] + [passage(2000, DOCS[1])]
    check(vecs, items, tvecs, texts)
    assert any(m.item.doc_sha == "d" * 64 for m in store.query_visual(q, 30, Filter.of(["d" * 64])))

    # another process removes document a: its items never come back
    other_process(tmp_path, "remove")
    for _ in range(2):  # while catching up (HNSW, re-opened) and after
        assert not any(m.item.doc_sha == DOCS[0] for m in store.query_visual(q, N + 200))
        assert not any(m.item.doc_sha == DOCS[0] for m in store.query_text(tq, N + 200))
        assert store.wait_for_scans(60)
    keep = [i for i, it in enumerate(items) if it.doc_sha != DOCS[0]]
    tkeep = [i for i, it in enumerate(texts) if it.doc_sha != DOCS[0]]
    vecs, items, tvecs, texts = vecs[keep], [items[i] for i in keep], tvecs[tkeep], [texts[i] for i in tkeep]
    check(vecs, items, tvecs, texts)
    assert store.scan_status()["visual"]["rows"] == len(items)

    # a reindex: the collection is replaced by one with other vectors, so the scan is read again
    new = store.start_replacement("visual", f"test|{DIM}")
    vecs = rng.standard_normal((len(items), DIM)).astype(np.float32)
    Store.add_to(new, items, vecs)
    store.finish_replacement("visual", new)
    store.query_visual(q, 5)
    assert store.wait_for_scans(60)
    check(vecs, items, tvecs, texts)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def test_memory_a_large_read_freed_goes_back_to_the_system():
    """A full read leaves the heap holding what Chroma's pages took, below memory still in use
    (glibc keeps it; at 100,000 items ~150 MB); the scan hands it back after its read
    (``release_freed_memory``: glibc's malloc_trim)."""
    import ctypes

    from index.scan import release_freed_memory

    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc: nothing to hand back this way")
    size = 4000  # malloc'd blocks (over Python's small-object limit), each written
    blocks = [b"x" * size for _ in range(50_000)]  # ~200 MB
    live = b"y" * size  # still in use, above them: the heap's top cannot shrink
    del blocks
    held = _rss_mb()
    release_freed_memory()
    assert held - _rss_mb() > 100, (held, _rss_mb())
    assert live[:1] == b"y"


def _metas(ids: range) -> list[dict]:
    kinds = ("page", "vector", "raster")
    return [{"doc_sha": DOCS[i // 3 % 3], "kind": kinds[i % 3], "label": ("chart", "photo")[i // 9 % 2],
             "page": 1 + i % 5} for i in ids]


@pytest.mark.parametrize("shape", ["spread", "shared_part", "ties"])
def test_the_int8_first_pass_gives_the_float32_products_answer(shape, monkeypatch):
    """Above COARSE_MIN_ROWS a query first scores every row in int8 and reads in float32 only
    the rows whose error bound can reach the top n: the answer (ids, scores, order of ties) is
    the full float32 product's, for spread-out vectors, vectors sharing a large common part (as
    CLIP embeddings do), and exact ties (the same figure stored twice), with a NaN and an
    infinite vector among them, under filters, through added, replaced and dropped rows and a
    compaction."""
    import index.scan as scan_module

    rng = np.random.default_rng({"spread": 1, "shared_part": 2, "ties": 3}[shape])
    rows, dim = 6000, 48
    vecs = rng.standard_normal((rows, dim)).astype(np.float32)
    if shape == "shared_part":  # pairwise cosine ~0.9
        vecs = (3 * rng.standard_normal(dim) + vecs).astype(np.float32)
    if shape == "ties":
        vecs[::7] = vecs[1::7][: len(vecs[::7])] if len(vecs[1::7]) >= len(vecs[::7]) else vecs[::7]
    vecs[17] = np.nan  # an embedding gone wrong: no bound for it, the others keep theirs
    scan = scan_module.ExactScan("visual", dim)
    for start in range(0, rows, 2000):  # as a read adds them: the int8 copy starts at COARSE_MIN_ROWS
        scan.add([f"v{i}" for i in range(start, start + 2000)], _metas(range(start, start + 2000)),
                 vecs[start:start + 2000])
    assert scan.codes is not None
    filters = [None, Filter.of(DOCS[1:], ["vector", "page"], ["chart", ""]), Filter.of(DOCS[:1], None, None)]

    def both(q, n, flt):
        fast = scan.nearest(q, n, flt)
        with monkeypatch.context() as m:
            m.setattr(scan_module, "COARSE_MIN_ROWS", 10 ** 9)
            plain = scan.nearest(q, n, flt)
        return fast, plain

    def check(queries):
        for q in queries:
            for n in (1, 10, 50):
                for flt in filters:
                    fast, plain = both(q, n, flt)
                    assert fast == plain
                    assert len(fast) == n

    queries = list(rng.standard_normal((8, dim)).astype(np.float32)) + [vecs[5], vecs[7 * 40]]
    if shape == "shared_part":
        queries = [q + 3 * np.nanmean(vecs, axis=0) for q in queries[:8]] + queries[8:]
    check(queries)
    answered = scan.first_pass["answered"]
    assert answered >= len(queries) * 3 * 3 // 2  # it narrowed most queries (else it tested nothing)

    # replace some rows, add new ones, drop enough to compact: the copy follows
    scan.add([f"v{i}" for i in range(0, 300)], _metas(range(300)), rng.standard_normal((300, dim)).astype(np.float32))
    scan.add([f"n{i}" for i in range(500)], _metas(range(500)), vecs[:500] * 2)  # ties with stored rows
    scan.add(["inf"], _metas(range(1)), np.full((1, dim), np.inf, np.float32))
    assert scan.drop([f"v{i}" for i in range(1000, 2700)]) == 1700
    assert len(scan.ids) < rows + 500  # compacted
    check(queries)
    assert scan.first_pass["answered"] > answered
