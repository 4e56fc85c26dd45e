"""Extraction on PDFs made here and on the real eval-dev PDFs (Debian documentation)."""

import io
import json

import pymupdf
import pytest
from PIL import Image

from ingest.extract import extract_pages, inspect_pdf, open_pdf
from mmrag.errors import BadDocument
from tests import pdfgen
from tests.conftest import EVAL, eval_pdf


def records(path, cfg):
    doc = open_pdf(path)
    return list(extract_pages(doc, "sha", cfg["ingest"]))


def test_vector_figure_is_one_figure_with_its_labels_and_caption(tmp_path, cfg):
    recs = records(pdfgen.figure_doc(tmp_path / "f.pdf", pages=1), cfg)
    figs = recs[0].figures
    assert len(figs) == 1
    f = figs[0]
    assert f.kind == "vector"
    x0, y0, x1, y1 = f.bbox  # the drawing spans 150..450 x 200..380 (tick marks included)
    assert x0 <= 151 and x1 >= 449 and y0 <= 221 and y1 >= 379
    assert f.caption.startswith("Figure 1: The parser feeds the renderer")
    assert "parser" in f.ocr_text and "renderer" in f.ocr_text  # labels inside belong to the figure
    img = Image.open(io.BytesIO(f.png))
    assert img.width > 500  # rendered at figure_dpi (144) over ~300 pt


def test_image_placed_twice_is_stored_once_and_keeps_its_colour(tmp_path, cfg):
    recs = records(pdfgen.figure_doc(tmp_path / "f.pdf", pages=2), cfg)
    figs = recs[1].figures
    assert [f.kind for f in figs] == ["raster", "raster"]
    assert figs[0].png == figs[1].png  # same bytes -> one content-addressed file
    img = Image.open(io.BytesIO(figs[0].png)).convert("RGB")
    # the placed image as the page shows it (180 x 135 pt): its own 120 x 90 px are below half
    # the figure dpi, so it is rendered at 72 dpi, exactly its placed rect
    assert img.size == (180, 135)
    assert img.getpixel((90, 15)) == (200, 30, 30)
    assert figs[0].caption.startswith("Fig. 2.")


def test_ruled_table_is_a_table_not_a_diagram(tmp_path, cfg):
    recs = records(pdfgen.figure_doc(tmp_path / "f.pdf", pages=3), cfg)
    tables = [f for f in recs[2].figures]
    assert [f.kind for f in tables] == ["table"]
    assert tables[0].caption.startswith("Table 3")


def test_text_chunks_drop_running_header_and_page_numbers(tmp_path, cfg):
    recs = records(pdfgen.figure_doc(tmp_path / "f.pdf", pages=4), cfg)
    text = " ".join(c.text for r in recs for c in r.chunks)
    assert "Figures explain what words cannot" in text
    assert "running header" not in text
    assert all(c.page == r.page for r in recs for c in r.chunks)


def _image_pdf(tmp_path, pix: pymupdf.Pixmap, mask: pymupdf.Pixmap | None = None):
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "A page with one image.")
    page.insert_image(pymupdf.Rect(100, 100, 300, 250), pixmap=pix, mask=mask.tobytes() if mask else None)
    path = tmp_path / "img.pdf"
    doc.save(path)
    return path


def test_cmyk_image_comes_out_in_correct_rgb(tmp_path, cfg):
    pix = pymupdf.Pixmap(pymupdf.csCMYK, pymupdf.IRect(0, 0, 80, 60), False)
    pix.set_rect(pix.irect, (0, 255, 255, 0))  # pure red in CMYK
    recs = records(_image_pdf(tmp_path, pix), cfg)
    img = Image.open(io.BytesIO(recs[0].figures[0].png)).convert("RGB")
    r, g, b = img.getpixel((40, 30))
    assert r > 200 and g < 60 and b < 60


def test_image_with_alpha_mask_is_composited_onto_white(tmp_path, cfg):
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 80, 60), True)
    pix.set_rect(pix.irect, (0, 0, 255, 255))
    pix.set_rect(pymupdf.IRect(0, 0, 40, 60), (0, 0, 255, 0))  # left half transparent (its colour: blue)
    recs = records(_image_pdf(tmp_path, pix), cfg)
    img = Image.open(io.BytesIO(recs[0].figures[0].png))
    assert img.mode == "RGB"  # what the page shows: paper where the image is transparent
    w, h = img.size
    assert img.getpixel((w // 8, h // 2)) == (255, 255, 255) and img.getpixel((7 * w // 8, h // 2)) == (0, 0, 255)


def test_tiny_and_repeated_images_are_decoration_unless_captioned(tmp_path, cfg):
    doc = pymupdf.open()
    logo = pdfgen.png_bytes((0, 128, 0), (40, 40))
    big = pdfgen.png_bytes((0, 0, 200), (200, 150))
    schematic = pdfgen.png_bytes((200, 30, 30), (120, 90))
    footer = pdfgen.png_bytes((90, 90, 90), (50, 40))
    for i in range(6):
        page = doc.new_page()
        page.insert_image(pymupdf.Rect(500, 20, 560, 60), stream=logo)  # logo on every page
        bullet = pdfgen.png_bytes((40 * i, 0, 0), (20, 20))  # a different tiny image on each page
        page.insert_image(pymupdf.Rect(72, 700, 82, 710), stream=bullet)
        page.insert_text((72, 100), f"Page {i} text.")
        page.insert_image(pymupdf.Rect(280, 740, 330, 780), stream=footer)  # footer logo on every page
        if i == 1:  # a figure captioned just above the footer logo: the caption is the figure's, not the logo's
            page.draw_rect(pymupdf.Rect(140, 560, 460, 690), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
            page.insert_text((140, 718), "Figure 2: The pump housing.", fontsize=10)
        if i % 2 == 0:  # one schematic shown again on three pages, captioned each time: a figure
            page.insert_image(pymupdf.Rect(100, 450, 280, 585), stream=schematic)
            page.insert_text((100, 600), f"Figure {i + 1}: The schematic again.", fontsize=10)
    page.insert_image(pymupdf.Rect(100, 200, 400, 420), stream=big)  # the one figure shown once
    doc.save(tmp_path / "d.pdf")
    recs = records(tmp_path / "d.pdf", cfg)
    figs = [f for r in recs for f in r.figures]
    assert [(f.page, f.kind, f.caption) for f in figs] == [
        (1, "raster", "Figure 1: The schematic again."), (2, "vector", "Figure 2: The pump housing."),
        (3, "raster", "Figure 3: The schematic again."),
        (5, "raster", "Figure 5: The schematic again."), (6, "raster", "")]


def test_scanned_page_is_ocred_into_chunks_and_its_figure_found(tmp_path, cfg):
    recs = records(pdfgen.scanned_doc(tmp_path / "s.pdf"), cfg)
    rec = recs[0]
    assert rec.scanned
    text = " ".join(c.text for c in rec.chunks)
    assert "quick scanner" in text.lower()
    assert all(c.source == "ocr" and c.page == 1 for c in rec.chunks)
    assert len(rec.figures) == 1
    x0, y0, x1, y1 = rec.figures[0].bbox
    assert abs(x0 - 150) < 8 and abs(y0 - 300) < 8 and abs(x1 - 450) < 8 and abs(y1 - 500) < 8


def test_page_images_are_rendered_at_page_dpi(tmp_path, make_cfg):
    cfg = make_cfg(ingest={"page_dpi": 36})
    recs = records(pdfgen.figure_doc(tmp_path / "f.pdf", pages=1), cfg)
    assert Image.open(io.BytesIO(recs[0].png)).size == (298, 421)  # A4 at half of 72 dpi


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"hello, I am a text file"), "not a PDF"),
    (lambda p: p.write_bytes(b"%PDF-1.7\n" + b"\x00garbage" * 50), "corrupt PDF"),
])
def test_bad_files_get_one_clear_reason(tmp_path, make, reason):
    path = tmp_path / "bad.pdf"
    make(path)
    with pytest.raises(BadDocument) as err:
        open_pdf(path)
    assert str(err.value).startswith("bad.pdf: ") and reason in str(err.value)


def test_a_dynamic_xfa_form_is_refused_with_a_hint_and_a_static_one_is_read(tmp_path):
    """A dynamic XFA form (LiveCycle: government and bank forms) shows only a "Please wait..."
    page outside Adobe Reader; ingesting it would store that notice as its content. A static XFA
    form draws its pages as usual and is read."""
    def xfa_form(path, dynamic):
        doc = pymupdf.open()
        page = doc.new_page()
        page.insert_text((72, 72), "Please wait..." if dynamic else "Application for a water permit", fontsize=14)
        cat = doc.pdf_catalog()
        xfa = doc.get_new_xref()
        doc.update_object(xfa, "<< >>")
        doc.update_stream(xfa, b'<xdp:xdp xmlns:xdp="http://ns.adobe.com/xdp/"><template/></xdp:xdp>')
        form = doc.get_new_xref()
        doc.update_object(form, f"<< /Fields [] /XFA [(template) {xfa} 0 R] >>")
        doc.xref_set_key(cat, "AcroForm", f"{form} 0 R")
        if dynamic:
            doc.xref_set_key(cat, "NeedsRendering", "true")
        doc.save(path)
        return path

    with pytest.raises(BadDocument, match="^form.pdf: a dynamic XFA form.*print it to PDF"):
        open_pdf(xfa_form(tmp_path / "form.pdf", dynamic=True))
    assert open_pdf(xfa_form(tmp_path / "static.pdf", dynamic=False)).page_count == 1


def test_encrypted_pdf_is_refused_with_a_hint(tmp_path):
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "secret")
    doc.save(tmp_path / "enc.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="pw")
    with pytest.raises(BadDocument, match="encrypted.*unencrypted copy"):
        open_pdf(tmp_path / "enc.pdf")


def test_inspect_reports_figures_without_rendering(tmp_path, cfg):
    out = inspect_pdf(pdfgen.figure_doc(tmp_path / "f.pdf", pages=3), cfg["ingest"])
    assert out["pages"] == 3 and out["chunks"] > 0
    assert [(f["page"], f["kind"]) for f in out["figures"]] == [(1, "vector"), (2, "raster"), (2, "raster"), (3, "table")]
    json.dumps(out)


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_labelled_figures_of_the_eval_corpus_are_found(cfg):
    """Issue 2's bar: figure recall >= 0.9 on eval-dev (IoU >= 0.3 or centre containment), with captions."""
    queries = [json.loads(line) for line in (EVAL / "queries.jsonl").read_text().splitlines() if line.strip()]
    queries = [q for q in queries if q["bbox"]]
    found = {}
    hits, captioned = 0, 0
    for q in queries:
        if q["doc"] not in found:
            found[q["doc"]] = inspect_pdf(eval_pdf(q["doc"]), cfg["ingest"])["figures"]
        b = q["bbox"]
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        ok = [f for f in found[q["doc"]] if f["page"] in q["pages"] and f["kind"] != "table" and (
            _iou(f["bbox"], b) >= 0.3 or (f["bbox"][0] <= cx <= f["bbox"][2] and f["bbox"][1] <= cy <= f["bbox"][3]))]
        hits += bool(ok)
        captioned += bool(ok and ok[0]["caption"])
    assert hits / len(queries) >= 0.9
    # 7 of the 33 targets have no caption at all (eval-dev README); the rest should have theirs
    assert captioned >= len(queries) - 7 - 2
