"""The library end to end on real Chroma: idempotent ingest, replace, remove, crash safety,
the model guard and reindex, local and server mode. ``snapshot`` also checks that the kept
original PDFs are exactly those of the listed documents."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmrag.errors import ModelMismatch
from mmrag.wiring import build
from tests import pdfgen
from tests.conftest import ROOT, eval_pdf, free_port


def snapshot(app):
    """Everything a user could see of the index: documents, item ids, image files, and what the
    keyword index holds (its item ids and documents), which must be the stored texts exactly."""
    lib = app.library
    visual = sorted(it.id for batch in lib.store.iter_items("visual") for it in batch)
    text = sorted(it.id for batch in lib.store.iter_items("text") for it in batch)
    files = sorted(str(p.relative_to(lib.data_dir)) for p in (lib.data_dir / "images").glob("*/*"))
    docs = [(d["doc"], d["sha256"], d["pages"], d["figures"], d["chunks"]) for d in lib.list()]
    keyword = sorted(lib.keyword.ids())
    assert keyword == text and lib.keyword.documents() == {d[1] for d in docs}
    # the original PDFs kept: exactly one per listed document, nothing half written or orphaned
    pdfs = sorted(p.name for p in (lib.data_dir / "pdfs").glob("*"))
    assert pdfs == sorted(f"{d[1]}.pdf" for d in docs)
    return {"docs": docs, "visual": visual, "text": text, "files": files, "keyword": keyword, "pdfs": pdfs}


def keyword_hits(app, question, **filters):
    return app.retriever.retrieve(question, k=50, signals=("keyword",), **filters)


def test_ingest_stores_figures_pages_and_chunks(app, tmp_path):
    pdf = pdfgen.figure_doc(tmp_path / "manual.pdf", pages=3)
    [res] = app.library.ingest([pdf])
    assert res.status == "added" and res.pages == 3 and res.figures == 4 and res.chunks >= 3
    snap = snapshot(app)
    assert len(snap["visual"]) == 3 + 4  # pages + figures
    assert set(snap["files"]) == app.library.referenced_images()
    # the image placed twice on p.2 is one file: 3 pages + vector + raster + table = 6 files
    assert len(snap["files"]) == 6
    [doc] = app.library.list()
    assert doc["doc"] == "manual.pdf" and doc["figures"] == 4


def test_a_portfolio_and_attached_pdfs_are_ingested_as_their_own_documents(app, tmp_path):
    """A PDF portfolio's pages are a cover sheet; its documents are embedded files (so are PDFs
    attached to a PDF). Each embedded PDF is ingested as a document of its own, named under the
    file that holds it (two with one file name keep their folders: neither replaces the other),
    searchable like any; other attachments are not read; one named .pdf that is no PDF is a
    failed result of its own and the rest still go in."""
    import pymupdf

    def one_page(text):
        doc = pymupdf.open()
        doc.new_page().insert_text((72, 72), text, fontsize=11)
        return doc.tobytes()

    cover = pymupdf.open()
    cover.new_page().insert_text((72, 72), "This portfolio holds the project's documents.", fontsize=11)
    cover.embfile_add("pump", one_page("Pump datasheet: impeller diameter 180 mm."), filename="datasheet.pdf")
    cover.embfile_add("valve", one_page("Valve manual: torque the gland nut to 25 Nm."), filename="sub/valve manual.pdf")
    cover.embfile_add("notes", b"plain text notes, not a PDF", filename="notes.txt")
    cover.embfile_add("fake", b"a text file named like a PDF", filename="fake.pdf")
    cover.embfile_add("r1", one_page("Report 2023: output 40 units."), filename="2023/report.pdf")  # one base name
    cover.embfile_add("r2", one_page("Report 2024: output 55 units."), filename="2024/report.pdf")
    cover.save(tmp_path / "project.pdf")

    results = app.library.ingest([tmp_path / "project.pdf"])
    assert [(r.name, r.status) for r in results] == [
        ("project.pdf", "added"), ("project.pdf/fake.pdf", "failed"), ("project.pdf/datasheet.pdf", "added"),
        ("project.pdf/valve manual.pdf", "added"), ("project.pdf/2023/report.pdf", "added"),
        ("project.pdf/2024/report.pdf", "added")]
    assert "not a PDF" in results[1].message
    assert sorted(d["doc"] for d in app.library.list()) == [
        "project.pdf", "project.pdf/2023/report.pdf", "project.pdf/2024/report.pdf", "project.pdf/datasheet.pdf",
        "project.pdf/valve manual.pdf"]
    snapshot(app)  # each kept as a PDF of its own, keyword index and store agree
    [hit] = [h for h in keyword_hits(app, "gland nut torque") if h.kind == "text"][:1]
    assert hit.doc == "project.pdf/valve manual.pdf" and hit.page == 1


def test_reingesting_or_a_renamed_copy_does_nothing(app, tmp_path):
    pdf = pdfgen.figure_doc(tmp_path / "manual.pdf", pages=2)
    app.library.ingest([pdf])
    before = snapshot(app)
    copy = tmp_path / "copy-of-manual.pdf"
    shutil.copy(pdf, copy)
    again, dup = app.library.ingest([pdf, copy])
    assert again.status == "unchanged" and "already ingested" in again.message
    assert dup.status == "unchanged" and "as manual.pdf" in dup.message
    assert snapshot(app) == before


def test_a_changed_file_replaces_its_old_version(app, tmp_path):
    pdf = pdfgen.figure_doc(tmp_path / "manual.pdf", pages=3)
    app.library.ingest([pdf])
    old_sha = app.library.list()[0]["sha256"]
    pdfgen.figure_doc(pdf, pages=1)  # same name, new content
    [res] = app.library.ingest([pdf])
    assert res.status == "replaced"
    assert {h.page for h in keyword_hits(app, "parser renderer")} == {1}  # nothing of the old pages 2-3
    [doc] = app.library.list()
    assert doc["pages"] == 1 and doc["sha256"] != old_sha
    snap = snapshot(app)
    assert len(snap["visual"]) == 2  # 1 page + 1 figure, nothing of the old version
    assert set(snap["files"]) == app.library.referenced_images()


def test_bad_files_fail_alone_and_store_nothing(app, tmp_path):
    good = pdfgen.figure_doc(tmp_path / "good.pdf", pages=1)
    (tmp_path / "notes.pdf").write_text("just text")
    (tmp_path / "empty.pdf").write_bytes(b"")
    results = app.library.ingest([tmp_path / "notes.pdf", good, tmp_path / "empty.pdf"])
    assert [r.status for r in results] == ["failed", "added", "failed"]
    assert "notes.pdf: not a PDF" in results[0].message
    assert [d["doc"] for d in app.library.list()] == ["good.pdf"]


def test_remove_deletes_items_and_orphan_images_only(app, tmp_path):
    a = pdfgen.figure_doc(tmp_path / "a.pdf", pages=2)
    b = pdfgen.figure_doc(tmp_path / "b.pdf", pages=1)
    app.library.ingest([a, b])
    assert {h.doc for h in keyword_hits(app, "parser renderer")} == {"a.pdf", "b.pdf"}
    app.library.remove("a.pdf")
    assert [d["doc"] for d in app.library.list()] == ["b.pdf"]
    assert {h.doc for h in keyword_hits(app, "parser renderer")} == {"b.pdf"}
    snap = snapshot(app)
    assert set(snap["files"]) == app.library.referenced_images()
    assert len(snap["visual"]) == 2
    with pytest.raises(Exception, match="no ingested document"):
        app.library.remove("a.pdf")


def test_the_model_guard_refuses_another_model_and_reindex_fixes_it(cfg, clip, passages, tmp_path):
    from index.embedders import ClipEmbedder
    from mmrag.devtools import write_tiny_clip

    app = build(cfg, clip=clip, passages=passages)
    app.library.ingest([pdfgen.figure_doc(tmp_path / "m.pdf", pages=2)])
    before = snapshot(app)
    other_cfg, other_ckpt = write_tiny_clip(tmp_path / "other", seed=1)
    other = ClipEmbedder(str(other_cfg), str(other_ckpt), "cpu")
    assert other.identity != clip.identity  # same architecture, other weights: another checkpoint hash
    mismatched = build(cfg, clip=other, passages=passages)
    assert [d["doc"] for d in mismatched.library.list()] == ["m.pdf"]  # listing needs no model
    with pytest.raises(ModelMismatch, match="mmrag reindex"):
        mismatched.retriever.retrieve("parser renderer", k=3)
    with pytest.raises(ModelMismatch, match="mmrag reindex"):
        mismatched.library.ingest([pdfgen.figure_doc(tmp_path / "n.pdf", pages=1)])
    fixed = build(cfg, clip=other, passages=passages, check=False)
    done = fixed.library.reindex()
    assert done["visual"] == len(before["visual"]) and done["text"] == len(before["text"])
    reopened = build(cfg, clip=other, passages=passages)  # no longer refused
    assert snapshot(reopened) == before
    assert reopened.retriever.retrieve("parser renderer", k=3)


def test_missing_weights_give_one_clear_error(tmp_path):
    from index.embedders import ClipEmbedder
    from mmrag.errors import WeightsUnavailable

    missing = ClipEmbedder("ViT-B-32", str(tmp_path / "nope.safetensors"), "cpu")  # loads nothing yet
    with pytest.raises(WeightsUnavailable, match="clip.pretrained.*local file"):
        missing.identity
    with pytest.raises(WeightsUnavailable, match="clip.pretrained.*local file"):
        missing.embed_texts(["a chart"])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", "from index.embedders import ClipEmbedder as C; "
                          "C('ViT-B-32', 'laion2b_s34b_b79k', 'cpu').embed_texts(['a chart'])"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "set clip.pretrained in config.yaml" in out.stderr


def _ingest_cmd(config):
    return [sys.executable, "-m", "mmrag", "--config", str(config), "ingest", "--quiet"]


def _generation(data_dir: Path) -> int:
    """The writer's count in DATA_DIR/generation: bumped when it takes the lock and after each
    document it commits (mmrag/library.py), so another process can follow its progress."""
    try:
        return int((data_dir / "generation").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_kill_9_during_ingest_leaves_nothing_half_done(write_config, tmp_path):
    """kill -9 while the second document goes in, just after the first became complete, then at
    random moments of the restarts; whatever is visible after each kill is complete, and the last
    restart finishes the job and equals a clean ingest. The first kill is placed by the writer's
    progress, not by a delay: a fixed delay killed before the first document was complete on a
    slow machine (so what a kill leaves visible was never checked) and after the whole ingest on
    a fast one."""
    pdfs = [pdfgen.figure_doc(tmp_path / f"doc{i}.pdf", pages=12) for i in range(2)]
    clean_cfg = write_config(data_dir=tmp_path / "clean")
    clean_cfg = clean_cfg.rename(tmp_path / "clean.yaml")
    subprocess.run(_ingest_cmd(clean_cfg) + [str(p) for p in pdfs], check=True, cwd=ROOT)
    import json

    import yaml

    def listed(cfg):
        out = subprocess.run([sys.executable, "-m", "mmrag", "--config", str(cfg), "list", "--json"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return {d["doc"]: d for d in json.loads(out)}

    complete = listed(clean_cfg)
    # each document: 4 vector figures, 4 pages with the same (captioned) image twice, 4 tables
    assert [(d["pages"], d["figures"]) for d in complete.values()] == [(12, 16), (12, 16)]
    data = tmp_path / "crashy"
    config = write_config(data_dir=data)

    body = yaml.safe_load(config.read_text())
    body["retrieval"] = {"weights": {"clip": 0.0, "text": 0.0, "keyword": 1.0}}
    keyword_only = tmp_path / "keyword-only.yaml"
    keyword_only.write_text(yaml.safe_dump(body))

    def check_visible() -> list[str]:
        """What list and search show after a kill: complete documents only (a search also
        repairs what the kill left). Returns their names."""
        visible = list(listed(config).values())
        for d in visible:
            assert d == complete[d["doc"]]
        found = subprocess.run([sys.executable, "-m", "mmrag", "--config", str(keyword_only), "search", "parser renderer",
                                "--kind", "text", "-k", "50", "--json"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
        assert {h["doc"] for h in json.loads(found)} == {d["doc"] for d in visible}
        return sorted(d["doc"] for d in visible)

    def start():
        """The ingest in a subprocess, once it holds the lock: (process, its generation then)."""
        g0 = _generation(data)
        proc = subprocess.Popen(_ingest_cmd(config) + [str(p) for p in pdfs], cwd=ROOT, stderr=subprocess.DEVNULL)
        while proc.poll() is None and _generation(data) <= g0:
            time.sleep(0.005)
        return proc, g0 + 1

    # 1. just after doc0 is committed, while doc1 goes in
    proc, locked = start()
    t0 = time.monotonic()
    while proc.poll() is None and _generation(data) <= locked:
        time.sleep(0.005)
    first_document_s = time.monotonic() - t0  # lock to the first commit: models loaded, one document
    assert proc.poll() is None, "the ingest finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert check_visible() == ["doc0.pdf"]
    # 2. at random moments of the restarts (which skip doc0 and ingest doc1 again from scratch)
    rng = random.Random(7)
    for _ in range(2):
        proc, _ = start()
        time.sleep(rng.uniform(0.1, 1.2) * first_document_s)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert "doc0.pdf" in check_visible()
    subprocess.run(_ingest_cmd(config) + [str(p) for p in pdfs], check=True, cwd=ROOT)
    from mmrag.config import load_config

    def snap(path):
        return snapshot(build(load_config(path)))

    a, b = snap(clean_cfg), snap(config)
    assert a == b


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory):
    exe = Path(sys.executable).with_name("chroma")
    port = free_port()
    path = tmp_path_factory.mktemp("chroma-server")
    proc = subprocess.Popen([str(exe), "run", "--path", str(path), "--port", str(port), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("chroma run did not start")
    yield port
    proc.terminate()
    proc.wait(10)


def test_server_mode_runs_the_same_library(make_cfg, clip, passages, chroma_server, tmp_path):
    cfg = make_cfg(chroma={"mode": "server", "host": "127.0.0.1", "port": chroma_server})
    app = build(cfg, clip=clip, passages=passages)
    pdf = pdfgen.figure_doc(tmp_path / "served.pdf", pages=3)
    [res] = app.library.ingest([pdf])
    assert res.status == "added"
    assert app.library.ingest([pdf])[0].status == "unchanged"
    hits = app.retriever.retrieve("Values in a ruled table", k=3, kinds=["table"])
    assert hits and hits[0].kind == "table" and hits[0].doc == "served.pdf"
    # the keyword index lives in the local data dir beside the remote Chroma
    assert (tmp_path / "data" / "keyword").is_dir()
    assert {h.kind for h in keyword_hits(app, "Values in a ruled table", kinds=["table"])} == {"table"}
    local = build(make_cfg(data_dir=tmp_path / "local"), clip=clip, passages=passages)
    local.library.ingest([pdf])
    assert snapshot(local)["visual"] == snapshot(app)["visual"]
    app.library.remove("served.pdf")
    assert app.library.list() == []


def test_real_debian_pdf_ingests(app):
    [res] = app.library.ingest([eval_pdf("neatoguide.pdf")])
    assert res.status == "added" and res.pages == 11 and res.figures >= 10


def test_interrupted_reindex_keeps_or_completes_the_index(cfg, clip, passages, tmp_path):
    import numpy as np

    from index.embedders import load_image
    from index.records import VisualItem
    from index.store import Store

    app = build(cfg, clip=clip, passages=passages)
    app.library.ingest([pdfgen.figure_doc(tmp_path / "m.pdf", pages=2)])
    before = snapshot(app)
    store = app.library.store
    # crash while filling: the half-filled replacement is dropped, the live index untouched
    half = store.start_replacement("visual", "other-model|64")
    Store.add_to(half, [VisualItem("x", "s", "m.pdf", 1, "page", "images/none.png")], np.ones((1, 64), "float32"))
    reopened = build(cfg, clip=clip, passages=passages)
    assert snapshot(reopened) == before
    names = {c.name for c in reopened.library.store.client.list_collections()}
    assert "mmrag_visual_next" not in names
    # crash after the replacement was marked complete: the next open finishes the swap
    new = store.start_replacement("visual", clip.identity)
    items = [it for batch in store.iter_items("visual") for it in batch]
    vecs = clip.embed_images([load_image(app.library.images.path(it.image)) for it in items])
    Store.add_to(new, items, vecs)
    new.modify(metadata={**new.metadata, "mmrag:complete": True})
    reopened = build(cfg, clip=clip, passages=passages)
    assert snapshot(reopened) == before
    assert reopened.retriever.retrieve("parser renderer", k=2)


def test_keyword_index_deleted_or_from_an_older_mmrag_is_rebuilt_from_the_store(cfg, clip, passages, tmp_path):
    app = build(cfg, clip=clip, passages=passages)
    app.library.ingest([pdfgen.figure_doc(tmp_path / "m.pdf", pages=2)])
    before = snapshot(app)
    want = [(h.id, h.score) for h in keyword_hits(app, "parser renderer")]
    assert want
    # a user deletes it (as a library made before the keyword index has none): the next search,
    # in a fresh process, rebuilds it from Chroma's stored texts and ranks the same
    shutil.rmtree(Path(cfg["data_dir"]) / "keyword")
    reopened = build(cfg, clip=clip, passages=passages)
    assert [(h.id, h.score) for h in keyword_hits(reopened, "parser renderer")] == want
    assert snapshot(reopened) == before
    # and so does the next writer, for an index whose last build was cut short
    kw = reopened.library.keyword
    kw._write_manifest(kw.documents(), complete=False)
    again = build(cfg, clip=clip, passages=passages)
    assert not again.library.keyword.covers([d[1] for d in before["docs"]])
    again.library.ingest([])
    assert again.library.keyword.covers([d[1] for d in before["docs"]]) and snapshot(again) == before


def test_keyword_search_filters_by_document_and_kind(app, tmp_path):
    a = pdfgen.figure_doc(tmp_path / "a.pdf", pages=3)
    b = pdfgen.figure_doc(tmp_path / "b.pdf", pages=1)
    app.library.ingest([a, b])
    assert {h.doc for h in keyword_hits(app, "parser renderer")} == {"a.pdf", "b.pdf"}
    assert {h.doc for h in keyword_hits(app, "parser renderer", docs=["b.pdf"])} == {"b.pdf"}
    tables = keyword_hits(app, "Values in a ruled table", kinds=["table"])
    assert tables and {h.kind for h in tables} == {"table"}
    assert {h.kind for h in keyword_hits(app, "parser renderer", kinds=["text"])} == {"text"}
    assert keyword_hits(app, "parser renderer", kinds=["page"]) == []


class _FailsOnCall:
    """The real passage model, except that its ``fail_on``-th call raises (a fault while a batch
    is embedded, e.g. the model running out of memory on a long file)."""

    def __init__(self, real, fail_on: int):
        self.real, self.fail_on, self.calls = real, fail_on, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def embed(self, texts):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("embedding failed on purpose")
        return self.real.embed(texts)


@pytest.mark.parametrize("workers", [2, 1])
def test_a_batch_failing_mid_file_rolls_the_file_back_and_the_next_file_goes_in(make_cfg, clip, passages,
                                                                               tmp_path, workers):
    """A long file is embedded and written in several batches (in a background thread when there
    are several extraction workers): the second batch fails, after the first was stored. The file
    fails with the error, none of it stays (items, images, keyword terms, the PDF), and the next
    file of the same command goes in whole (each of its pages once)."""
    from mmrag.library import FLUSH_ITEMS

    faulty = _FailsOnCall(passages, fail_on=2)
    app = build(make_cfg(ingest={"workers": workers}), clip=clip, passages=faulty)
    long_pdf = pdfgen.figure_doc(tmp_path / "long.pdf", pages=FLUSH_ITEMS // 2 + 8)  # > 1 batch of images
    short_pdf = pdfgen.figure_doc(tmp_path / "short.pdf", pages=3)
    failed, added = app.library.ingest([long_pdf, short_pdf])
    assert failed.status == "failed" and "embedding failed on purpose" in failed.message
    assert faulty.calls >= 3  # the first batch was written before the failure, the next file after
    assert added.status == "added" and added.pages == 3
    snap = snapshot(app)
    assert [d[0] for d in snap["docs"]] == ["short.pdf"]
    assert app.library.store.list_docs(status=None) == app.library.store.list_docs()  # nothing pending
    assert set(snap["files"]) == app.library.referenced_images()
    pages = [it.page for batch in app.library.store.iter_items("visual") for it in batch if it.kind == "page"]
    assert sorted(pages) == [1, 2, 3]
