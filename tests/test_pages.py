"""The original PDFs kept in the data dir (content-addressed, removed with their document, none
left by a failed or interrupted ingest) and pages rendered from them with the cited box
highlighted, checked against where a viewer shows the figure (real Chroma, PDFs made here)."""

import io
import shutil

import numpy as np
import pymupdf
import pytest
from PIL import Image

from mmrag.errors import MMRagError, NotFound
from mmrag.wiring import build
from tests import pdfgen

PANEL = pymupdf.Rect(300, 120, 500, 280)  # where the viewer shows the figure (displayed page, points)


def rotated_cropped_doc(path, rotation=90):
    """One page turned by ``rotation`` with an offset CropBox; a blue panel with its caption reads
    upright at PANEL on screen (the construction of test_realworld_kinds' geometry tests)."""
    crop_box = pymupdf.Rect(30, 40, 582, 752)
    probe = pymupdf.open().new_page(width=612, height=792)
    probe.set_cropbox(crop_box)
    probe.set_rotation(rotation)
    m, off = probe.derotation_matrix, pymupdf.Point(crop_box.tl)
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)

    def text(x, y, s, size):
        page.insert_text(pymupdf.Point(x, y) * m + off, s, fontsize=size, rotate=rotation)

    text(72, 60, "Quarterly results overview", 14)
    text(72, 100, "Body text on the left side of the page.", 10)
    page.draw_rect(PANEL * m + (off.x, off.y, off.x, off.y), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
    text(300, 300, "Figure 1: Blue panel of the results.", 10)
    page.set_cropbox(crop_box)
    page.set_rotation(rotation)
    doc.save(path)
    return path


def magenta(png):
    """Mask of highlight-outline pixels (strong magenta), found by colour alone."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return (a[..., 0] > 190) & (a[..., 1] < 60) & (a[..., 2] > 70) & (a[..., 2] < 160)


def test_pdf_kept_by_sha_and_removed_with_its_document(app, tmp_path):
    pdf = pdfgen.figure_doc(tmp_path / "manual.pdf", pages=2)
    copy = tmp_path / "copy.pdf"
    shutil.copy(pdf, copy)
    [res] = app.library.ingest([pdf])
    kept = app.library.pdf_path("manual.pdf")
    assert kept == app.library.data_dir / "pdfs" / f"{res.sha256}.pdf"
    assert kept.read_bytes() == pdf.read_bytes()
    assert app.library.ingest([copy])[0].status == "unchanged"  # the same bytes: still one file
    assert app.library.pdf_path(res.sha256[:12]) == kept
    app.library.remove("manual.pdf")
    assert not kept.exists() and list((app.library.data_dir / "pdfs").iterdir()) == []


def test_an_interrupted_ingest_keeps_no_pdf_and_a_replaced_version_loses_its_own(app, tmp_path):
    """Ctrl-C in the middle of a file (after its PDF was copied in): rolled back, no PDF left."""
    from mmrag.library import Progress

    pdf = pdfgen.figure_doc(tmp_path / "manual.pdf", pages=3)
    pdfs = app.library.data_dir / "pdfs"
    seen = []

    class CtrlC(Progress):
        def page(self, done):
            seen.append(sorted(p.name for p in pdfs.iterdir()))  # kept while the pages go in
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        app.library.ingest([pdf], progress=CtrlC())
    assert seen and len(seen[0]) == 1 and seen[0][0].endswith(".pdf")
    assert app.library.list() == [] and list(pdfs.iterdir()) == []
    [first] = app.library.ingest([pdf])
    pdfgen.figure_doc(pdf, pages=2)  # same name, new content
    [second] = app.library.ingest([pdf])
    assert second.status == "replaced" and first.sha256 != second.sha256
    assert sorted(p.name for p in pdfs.iterdir()) == [f"{second.sha256}.pdf"]


def test_recover_sweeps_orphan_and_half_written_pdfs(app, tmp_path):
    [res] = app.library.ingest([pdfgen.figure_doc(tmp_path / "m.pdf", pages=1)])
    pdfs = app.library.data_dir / "pdfs"
    # what a kill leaves: a temp file mid-copy, a PDF whose document record is gone
    (pdfs / f"{'b' * 64}.pdf.tmp4242").write_bytes(b"%PDF-1.7 half")
    (pdfs / f"{'c' * 64}.pdf").write_bytes(b"%PDF-1.7 orphan")
    app.library.ingest([])  # any writer recovers first
    assert sorted(p.name for p in pdfs.iterdir()) == [f"{res.sha256}.pdf"]


def test_a_library_from_before_kept_pdfs_says_to_reingest(app, tmp_path):
    pdf = pdfgen.figure_doc(tmp_path / "old.pdf", pages=1)
    [res] = app.library.ingest([pdf])
    shutil.rmtree(app.library.data_dir / "pdfs")  # what an older mmrag left: no kept PDFs
    with pytest.raises(NotFound, match="re-ingest it to enable page views"):
        app.library.page_png("old.pdf", 1)
    assert app.library.reindex()["without_pdf"] == 1
    assert [d["doc"] for d in app.library.list()] == ["old.pdf"]  # nothing else changed
    app.library.remove("old.pdf")  # and removing it works without the file
    assert app.library.list() == []


@pytest.mark.parametrize("rotation", [90, 270])
def test_page_render_highlights_the_figure_where_the_viewer_shows_it(app, tmp_path, rotation):
    [res] = app.library.ingest([rotated_cropped_doc(tmp_path / "r.pdf", rotation)])
    [fig] = [it for it in app.library.store.visual_items() if it.kind != "page"]
    where = app.library.locate(fig.id)
    assert where["doc_sha"] == res.sha256 and where["page"] == 1
    dpi = 144
    png = app.library.page_png("r.pdf", 1, items=[fig.id], dpi=dpi)
    img = Image.open(io.BytesIO(png))
    assert img.size == (round(712 * 2), round(552 * 2))  # the displayed (cropped, turned) page at 2 px/pt
    mask = magenta(png)
    z = dpi / 72
    x0, y0, x1, y1 = (round(v * z) for v in PANEL)
    m = 8 * round(z)  # the outline may reach a few points beyond the figure's box
    assert mask[y0 - m:y1 + m, x0 - m:x1 + m].sum() > 0.9 * mask.sum() > 0  # all highlight at the figure
    for edge in (mask[y0 - m:y0 + m, x0:x1], mask[y1 - m:y1 + m, x0:x1],
                 mask[y0:y1, x0 - m:x0 + m], mask[y0:y1, x1 - m:x1 + m]):
        assert edge.any(axis=0 if edge.shape[0] < edge.shape[1] else 1).mean() > 0.9  # each side outlined
    plain = np.asarray(Image.open(io.BytesIO(app.library.page_png("r.pdf", 1, dpi=dpi))).convert("RGB")).astype(int)
    tinted = np.asarray(img.convert("RGB")).astype(int)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    assert not magenta(app.library.page_png("r.pdf", 1, dpi=dpi)).any()
    assert (tinted[cy, cx] != plain[cy, cx]).any()  # the inside is tinted, still showing the figure
    assert tinted[cy, cx][2] > 150  # blue shows through


def test_page_render_errors_are_one_line(app, tmp_path):
    app.library.ingest([pdfgen.figure_doc(tmp_path / "m.pdf", pages=2)])
    [fig] = [it for it in app.library.store.visual_items() if it.kind == "vector"]
    with pytest.raises(MMRagError, match="page 9 is out of range: the document has 2 page"):
        app.library.page_png("m.pdf", 9)
    with pytest.raises(MMRagError, match="is on m.pdf p.1, not on this page"):
        app.library.page_png("m.pdf", 2, items=[fig.id])
    with pytest.raises(NotFound, match="no stored item"):
        app.library.page_png("m.pdf", 1, items=["../../etc/passwd"])
    with pytest.raises(MMRagError, match="a box is four numbers"):
        app.library.page_png("m.pdf", 1, boxes=[(1, 2, 3)])
    with pytest.raises(NotFound, match="no ingested document"):
        app.library.page_png("../../etc/passwd", 1)
