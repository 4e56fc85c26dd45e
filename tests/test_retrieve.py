"""Retrieval's signals searched at the same time on a real library (Chroma, Tantivy, the tiny
CLIP and MiniLM): they really overlap, the ranking is the one a search made signal after signal
gives, and an error on the passage side reaches the caller."""

import copy
import threading

import pytest

import assistant.retrieve as retrieve_module
from mmrag.config import DEFAULTS
from mmrag.wiring import build
from tests import pdfgen

QUESTIONS = ["parser feeds the renderer", "Values in a ruled table", "start end diagram", "figure on page 2",
             "what does the table list", "red image"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_clip_files, clip, passages):
    tmp = tmp_path_factory.mktemp("retrieve")
    cfg = copy.deepcopy(DEFAULTS)
    cfg["data_dir"] = str(tmp / "data")
    cfg["clip"].update(model=str(tiny_clip_files[0]), pretrained=str(tiny_clip_files[1]), device="cpu")
    app = build(cfg, clip=clip, passages=passages)
    app.library.ingest([pdfgen.figure_doc(tmp / "manual.pdf", pages=3), pdfgen.figure_doc(tmp / "other.pdf", pages=2)])
    return app


def test_the_passage_side_is_searched_while_the_clip_side_is(app, monkeypatch):
    store = app.retriever.store
    both = threading.Barrier(2, timeout=10)  # met only when the two queries are in flight together
    met = []
    query_text, query_visual = store.query_text, store.query_visual

    def meet():
        try:
            both.wait()
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)

    def text_side(*a, **kw):
        meet()
        return query_text(*a, **kw)

    def clip_side(*a, **kw):
        meet()
        return query_visual(*a, **kw)

    monkeypatch.setattr(store, "query_text", text_side)
    monkeypatch.setattr(store, "query_visual", clip_side)
    assert app.retriever.retrieve("a question never asked before")
    assert met == [True, True]


@pytest.mark.parametrize("filters", [{}, {"k": 30}, {"kinds": ["vector", "table"]}, {"kinds": ["text"]},
                                     {"docs": ["other.pdf"]}], ids=str)
def test_the_ranking_is_the_one_a_search_signal_by_signal_gives(app, monkeypatch, filters):
    together = [app.retriever.retrieve(q, **filters) for q in QUESTIONS]
    monkeypatch.setattr(retrieve_module, "_SEARCH", retrieve_module.OneByOne())
    assert together == [app.retriever.retrieve(q, **filters) for q in QUESTIONS]
    assert all(together) and any(len({s for h in hits for s in h.signals}) > 1 for hits in together)  # fused


def test_an_error_on_the_passage_side_reaches_the_caller(app, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("the passage collection is gone")

    monkeypatch.setattr(app.retriever.store, "query_text", broken)
    with pytest.raises(RuntimeError, match="passage collection is gone"):
        app.retriever.retrieve("parser feeds the renderer")


def test_above_ef_search_records_are_read_after_fusion_with_the_same_hits(app, passages, monkeypatch):
    """When the exact scan answers (more items than ``ef_search``: lowered here so that this small
    library has it), the CLIP side comes back without records and only fusion's survivors are
    read, with their descriptions: the hits are the ones that reading every match's record
    gives; a figure whose image file is gone is skipped and the next one read in its place."""
    from mmrag.describing import FigureToDescribe

    store = app.retriever.store
    figures = [v for v in store.visual_items() if v.kind != "page"]
    described = [FigureToDescribe.of(f).description_passage(f"A drawing of {f.kind} number {i}.")
                 for i, f in enumerate(figures[:3])]
    store.add_text(described, passages.embed([d.text for d in described]))
    monkeypatch.setattr(store, "ef_search", 2)
    query_visual, unread = store.query_visual, []

    def spy(vector, n, flt=None, records=True):
        got = query_visual(vector, n, flt, records)
        unread.append(sum(m.item is None for m in got))
        return got

    asks = [(q, f) for q in QUESTIONS + ["a drawing of vector number 1"] for f in ({}, {"k": 30}, {"kinds": ["vector", "raster", "page"]})]
    monkeypatch.setattr(store, "query_visual", spy)
    lazy = [app.retriever.retrieve(q, **f) for q, f in asks]
    assert sum(unread) > 0  # the scan answered without records
    monkeypatch.setattr(store, "query_visual", lambda vector, n, flt=None, records=True: query_visual(vector, n, flt))
    eager = [app.retriever.retrieve(q, **f) for q, f in asks]
    assert lazy == eager
    assert {h.description for hits in lazy for h in hits} >= {d.text for d in described}

    monkeypatch.setattr(store, "query_visual", spy)
    hits = app.retriever.retrieve(QUESTIONS[0], k=5)
    gone = next(h for h in hits if h.image and h.kind != "page")
    hidden = gone.image + ".away"
    import os

    os.rename(gone.image, hidden)
    monkeypatch.setattr(retrieve_module, "_SLACK", 0)  # the skipped ones make it read the next
    try:
        again = app.retriever.retrieve(QUESTIONS[0], k=5)
    finally:
        os.rename(hidden, gone.image)
    # (images are stored by content: every figure showing that image is skipped)
    assert gone.image not in [h.image for h in again] and len(again) == 5
    assert again == [h for h in app.retriever.retrieve(QUESTIONS[0], k=10) if h.image != gone.image][:5]
