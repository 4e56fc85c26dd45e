"""The store on a real Chroma collection: filtered nearest-neighbour queries against brute force
(whatever path the store takes: no oversampling, 3x oversampling, Chroma's where filter, the
answer is the nearest n items the filter accepts), a Filter's Chroma ``where`` against its Python
check, and records round-tripping through Chroma metadata."""

import itertools

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from index.records import KINDS, Filter, TextItem, VisualItem
from index.store import Store

DIM = 16


def visual(i: int) -> VisualItem:
    # every third item is a page render; 15 items belong to a rare document
    kind = "page" if i % 3 == 0 else ("vector", "raster", "table")[i % 3 - 1 + (i % 7 == 0)]
    return VisualItem(f"v{i}", "rare" if i % 40 == 0 else "common", "d.pdf", i % 5 + 1, kind, f"images/{i}.png",
                      None if kind == "page" else (1.0, 2.0, 3.5, 4.3), label="" if kind == "page" else
                      ("chart", "diagram")[i % 2], figure=0 if kind == "page" else i % 3, scanned=kind == "page" and i % 2 == 0)


def text(i: int) -> TextItem:
    figure_text = i % 4 == 0
    return TextItem(f"t{i}", ("a", "b", "c")[i % 3], "d.pdf", i % 5 + 1, "figure_text" if figure_text else "text",
                    f"f-{i // 4}" if figure_text else f"t{i}", f"passage {i}", (0.0, 1.0, 2.0, 3.0),
                    ("raster", "vector", "table")[i % 3] if figure_text else ("text", "ocr")[i % 2])


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((600, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    items = [visual(i) for i in range(len(vecs))]
    client = chromadb.PersistentClient(path=str(tmp_path_factory.mktemp("chroma")),
                                       settings=Settings(anonymized_telemetry=False))
    store = Store(client, f"test|{DIM}", "test-text|8")
    store.add_visual(items, vecs)
    texts = [text(i) for i in range(120)]
    store.add_text(texts, rng.standard_normal((len(texts), 8)).astype(np.float32))
    return store, vecs, items, texts, rng.standard_normal((20, DIM)).astype(np.float32)


def brute_force(vecs, items, q, n, keep):
    order = np.argsort(-(vecs @ (q / np.linalg.norm(q))), kind="stable")
    return [f"v{i}" for i in order if keep(items[i])][:n]


@pytest.mark.parametrize("name, flt", [
    ("everything", None),
    ("drops a third", Filter.of(kinds=["vector", "raster", "table"])),
    ("rare document", Filter.of(documents=["rare"])),
    ("labels", Filter.of(kinds=["vector"], labels=["chart"])),
])
def test_filtered_query_is_the_nearest_accepted_items(filled, name, flt):
    store, vecs, items, _, queries = filled
    keep = flt.accepts if flt else (lambda it: True)
    for q in queries:
        got = store.query_visual(q, 10, flt)
        assert [m.id for m in got] == brute_force(vecs, items, q, 10, keep), name
        assert all(keep(m.item) for m in got)
        assert [m.score for m in got] == sorted((m.score for m in got), reverse=True)


FILTERS = [Filter()] + [Filter.of(docs, kinds, labels, page) for docs, kinds, labels, page in itertools.product(
    (None, ["rare"], ["a", "c"], []), (None, ["page"], ["text"], ["vector", "table"], ["raster", "text", "page"]),
    (None, ["chart"]), (None, 2))]


def test_where_and_accepts_are_the_same_filter(filled):
    """Every filter, as Chroma's where and as the Python check, picks the same items."""
    store, _, items, texts, _ = filled
    for flt in FILTERS:
        want_visual = sorted(it.id for it in items if flt.accepts(it))
        assert sorted(it.id for it in store.visual_items(flt)) == want_visual, flt
        want_text = sorted(it.id for it in texts if flt.accepts(it))
        assert sorted(it.id for it in store.text_items(flt)) == want_text, flt
    assert any(store.text_items(f) for f in FILTERS if f.kinds == {"raster", "text", "page"})  # not all empty


def test_records_come_back_as_they_were_stored(filled):
    store, _, items, texts, _ = filled
    assert store.get_visual([items[0].id, items[1].id, "nope"]) == [items[0], items[1]]
    by_id = {t.id: t for t in store.text_items()}
    assert [by_id[t.id] for t in texts] == texts
    assert {t.stands_for for t in texts} == set(KINDS) - {"page"}


def test_a_query_on_an_empty_store_finds_nothing(tmp_path):
    client = chromadb.PersistentClient(path=str(tmp_path), settings=Settings(anonymized_telemetry=False))
    store = Store(client, f"test|{DIM}", "test-text|8")
    assert store.query_visual(np.ones(DIM, np.float32), 5, Filter()) == []
    assert store.query_text(np.ones(8, np.float32), 5) == []
    assert store.visual_items() == [] and store.list_docs() == []


def test_search_is_exact_up_to_ef_search_items_even_on_an_index_made_before(tmp_path):
    """Chroma's default search breadth (ef 100) returns approximate neighbours: which items come back
    then depends on how the graph happened to be built. With the default ``chroma.ef_search`` a
    library of up to that many items is searched exhaustively, and an index made with another
    value is brought up to it when opened."""
    from chromadb.api.client import SharedSystemClient

    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((1500, 128)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = rng.standard_normal((20, 128)).astype(np.float32)

    def open_store(**kw):
        SharedSystemClient.clear_system_cache()  # a new process, as far as Chroma's caches go
        client = chromadb.PersistentClient(path=str(tmp_path), settings=Settings(anonymized_telemetry=False))
        # HNSW's own breadth is under test: no exact scan above ef_search (tests/test_scan.py)
        return Store(client, "test|128", "test-text|8", exact_scan="off", **kw)

    nearest = [brute_force(vecs, [None] * len(vecs), q, 50, lambda it: True) for q in queries]

    def exact_answers(store):
        return sum([m.id for m in store.query_visual(q, 50)] == want for q, want in zip(queries, nearest))

    old = open_store(ef_search=10)
    old.add_visual([VisualItem(f"v{i}", "s", "d.pdf", 1, "vector", "") for i in range(len(vecs))], vecs)
    assert exact_answers(old) < len(queries)  # the narrow search really is approximate here
    assert exact_answers(open_store()) == len(queries)
    # the breadth is applied before anything loads the index: a count or a listing first (which
    # loads it in this process) must not leave the searches narrow
    old = open_store(ef_search=10)
    assert exact_answers(old) < len(queries)
    first_read = open_store()
    assert first_read.count("visual") == len(vecs)
    assert exact_answers(first_read) == len(queries)


def test_the_listed_documents_follow_every_change_to_the_registry(tmp_path):
    """The embedded store keeps the list of complete documents between searches; every change
    must still show at once: its own writes (set_doc, set_docs, delete_records) and another
    process's commit (which moves the generation file)."""
    gen = tmp_path / "generation"

    def open_store():
        client = chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False))
        return Store(client, f"test|{DIM}", "test-text|8", generation=gen)

    ours, other = open_store(), open_store()

    def listed(status="complete"):
        return [d.doc for d in ours.list_docs(status)]

    assert listed() == []
    ours.set_doc("s1", doc="a.pdf", status="complete")
    assert listed() == listed() == ["a.pdf"]
    ours.set_docs({"s1": {"status": "removing"}, "s2": {"doc": "b.pdf", "status": "complete"}})
    assert listed() == ["b.pdf"] and listed("removing") == ["a.pdf"]
    other.set_doc("s3", doc="c.pdf", status="complete")
    other.bump()  # another process's commit
    assert listed() == ["b.pdf", "c.pdf"]
    ours.delete_records(["s2"])
    assert listed() == ["c.pdf"]
    got = ours.list_docs()
    got.clear()  # a caller changing its list changes nothing kept
    assert listed() == ["c.pdf"]


def _huge_bytes(lo: int, hi: int) -> int:
    """AnonHugePages of this process's mappings that overlap [lo, hi)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            a, b = (int(x, 16) for x in head.split("-"))
            inside = a < hi and b > lo
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) << 10
    return total


def _thp_possible() -> bool:
    import platform
    import sys
    from pathlib import Path

    if not sys.platform.startswith("linux"):
        return False
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return enabled.is_file() and "[never]" not in enabled.read_text() and (major, minor) >= (6, 1)


def test_large_resident_memory_moves_to_huge_pages_with_its_bytes_unchanged():
    """What a loaded 100k-item HNSW index gets (index/hugepages.py): 2 MB pages where the kernel
    can (Linux 6.1+, THP not off), nothing elsewhere; the data is the same either way."""
    import ctypes
    import hashlib
    import mmap
    from pathlib import Path

    from index import hugepages

    hugepages.settle()  # no move started by an earlier test (every ONNX session starts one) races this one
    # private anonymous memory, as a C++ index mallocs, every page written, in 4 KB pages whatever the
    # system's THP mode: with ``always`` the kernel hands out 2 MB pages at the first write, so there
    # the writes happen under MADV_NOHUGEPAGE, lifted afterwards by MADV_HUGEPAGE (the only way to
    # lift it), which lets khugepaged collapse up to ``pages_to_scan`` pages of it per pass (16 MB by
    # default, one pass every 10 s): the slack allowed before the move. An inaccessible page on each
    # side keeps the kernel from merging the mapping with a neighbour whose huge pages smaps would
    # count as ours.
    thp = Path("/sys/kernel/mm/transparent_hugepage")
    always = (thp / "enabled").is_file() and "[always]" in (thp / "enabled").read_text()
    try:
        slack = 2 * int((thp / "khugepaged" / "pages_to_scan").read_text()) * 4096
    except (OSError, ValueError):
        slack = 32 << 20
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page, size = 4096, 160 << 20
    base = libc.mmap(None, size + 2 * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    lo = base + page
    try:
        assert libc.mprotect(base, page, 0) == 0 and libc.mprotect(lo + size, page, 0) == 0
        if always:
            libc.madvise(lo, size, getattr(mmap, "MADV_NOHUGEPAGE", 15))
        ctypes.memmove(lo, bytes(range(256)) * (size // 256), size)
        if always:
            libc.madvise(lo, size, getattr(mmap, "MADV_HUGEPAGE", 14))
        before = hashlib.sha256(ctypes.string_at(lo, size)).hexdigest()
        assert _huge_bytes(lo, lo + size) <= slack
        collapsed = hugepages.collapse_large_regions()
        if _thp_possible():
            assert collapsed >= 128 << 20
            assert _huge_bytes(lo, lo + size) >= 128 << 20
        else:
            assert collapsed == 0
        assert hashlib.sha256(ctypes.string_at(lo, size)).hexdigest() == before
        assert hugepages.collapse_large_regions() < 2 << 20  # done once: the same ranges are not collapsed again
    finally:
        libc.munmap(base, size + 2 * page)


def test_moves_asked_for_at_once_share_one_thread(monkeypatch):
    """Every ONNX session and loaded collection asks for the move; on 2 cores a thread each would
    compete with the first question: one thread does it, scanning again if asked meanwhile. The
    scan is held until the 20 requests are in (where THP is off, or on a fast machine, the real one
    ends at once, and a thread per request would leave at most one alive to count)."""
    import threading

    from index import hugepages

    hugepages.settle()
    scans, release = [], threading.Event()

    def held_scan(min_mb=64):
        scans.append(threading.current_thread().name)
        assert release.wait(30)
        return 0

    monkeypatch.setattr(hugepages, "collapse_large_regions", held_scan)
    try:
        for _ in range(20):
            hugepages.collapse_in_background()
        assert sum(t.name == "mmrag-hugepages" for t in threading.enumerate()) == 1
    finally:
        release.set()
    hugepages.settle()
    assert scans == ["mmrag-hugepages"] * 2  # the first scan, and one more for the requests meanwhile
    assert not [t for t in threading.enumerate() if t.name == "mmrag-hugepages"]


def test_the_first_query_of_each_loaded_collection_starts_the_move_to_huge_pages(tmp_path, monkeypatch):
    from index import hugepages

    calls = []
    monkeypatch.setattr(hugepages, "collapse_in_background", lambda *a: calls.append(a))
    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    store = Store(client, f"test|{DIM}", "test-text|8")
    rng = np.random.default_rng(1)
    store.add_visual([visual(i) for i in range(30)], rng.standard_normal((30, DIM)).astype(np.float32))
    store.add_text([text(i) for i in range(30)], rng.standard_normal((30, 8)).astype(np.float32))
    store.query_visual(rng.standard_normal(DIM), 5)
    store.query_visual(rng.standard_normal(DIM), 5, Filter.of(kinds=["page"]))
    assert len(calls) == 1
    store.query_text(rng.standard_normal(8), 5)
    assert len(calls) == 2
