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
