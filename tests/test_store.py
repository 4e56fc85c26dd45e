"""Filtered nearest-neighbour queries on a real Chroma collection against brute force: whatever
path the store takes (no oversampling, 3x oversampling, Chroma's where filter), the answer is the
nearest n items the filter accepts."""

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings

from index.store import Store

DIM = 16


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((600, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    # every third item is a page render; 15 items belong to a rare document
    metas = [{"doc_sha": "rare" if i % 40 == 0 else "common", "kind": "page" if i % 3 == 0 else "vector"}
             for i in range(len(vecs))]
    client = chromadb.PersistentClient(path=str(tmp_path_factory.mktemp("chroma")),
                                       settings=Settings(anonymized_telemetry=False))
    store = Store(client, f"test|{DIM}", "test-text|8")
    store.add_visual([f"v{i}" for i in range(len(vecs))], vecs, metas)
    return store, vecs, metas, rng.standard_normal((20, DIM)).astype(np.float32)


def brute_force(vecs, metas, q, n, keep):
    order = np.argsort(-(vecs @ (q / np.linalg.norm(q))), kind="stable")
    return [f"v{i}" for i in order if keep(metas[i])][:n]


@pytest.mark.parametrize("name, keep, where", [
    ("everything", lambda m: True, None),
    ("drops a third", lambda m: m["kind"] != "page", {"kind": {"$ne": "page"}}),
    ("rare document", lambda m: m["doc_sha"] == "rare", {"doc_sha": "rare"}),
])
def test_filtered_query_is_the_nearest_accepted_items(filled, name, keep, where):
    store, vecs, metas, queries = filled
    for q in queries:
        got = store.query_visual(q, 10, where, keep)
        assert [m.id for m in got] == brute_force(vecs, metas, q, 10, keep), name
        assert all(keep(m.metadata) for m in got)
        assert [m.score for m in got] == sorted((m.score for m in got), reverse=True)


def test_a_query_on_an_empty_store_finds_nothing(tmp_path):
    client = chromadb.PersistentClient(path=str(tmp_path), settings=Settings(anonymized_telemetry=False))
    store = Store(client, f"test|{DIM}", "test-text|8")
    assert store.query_visual(np.ones(DIM, np.float32), 5, None, lambda m: True) == []
    assert store.query_text(np.ones(8, np.float32), 5) == []


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
        return Store(client, "test|128", "test-text|8", **kw)

    nearest = [brute_force(vecs, [{}] * len(vecs), q, 50, lambda m: True) for q in queries]

    def exact_answers(store):
        return sum([m.id for m in store.query_visual(q, 50)] == want for q, want in zip(queries, nearest))

    old = open_store(ef_search=10)
    old.add_visual([f"v{i}" for i in range(len(vecs))], vecs, [{"kind": "vector"}] * len(vecs))
    assert exact_answers(old) < len(queries)  # the narrow search really is approximate here
    assert exact_answers(open_store()) == len(queries)
