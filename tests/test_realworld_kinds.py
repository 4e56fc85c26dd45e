"""Kinds of real-world PDFs (see ../shared/realworld/): each test makes its own input with PyMuPDF
and asserts the value a user needs: which files and names, no silent loss, normalised text,
page geometry, images as the page shows them, captions, one figure per figure."""

import io

import numpy as np
import pymupdf
import pytest
from PIL import Image

import ingest.extract
from ingest.extract import extract_pages, inspect_pdf, open_pdf
from mmrag.cli import _pdfs


def records(path, cfg, render=True):
    doc = open_pdf(path)
    return list(extract_pages(doc, "sha", cfg["ingest"], render=render))


def one_page_pdf(path, text):
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), text, fontsize=11)
    doc.save(path)
    return path


# ---- which files, and which document ---------------------------------------------------------

def test_folder_walk_takes_pdf_in_any_case_and_names_by_relative_path(tmp_path):
    (tmp_path / "inbox" / "2023").mkdir(parents=True)
    (tmp_path / "inbox" / "2024").mkdir()
    one_page_pdf(tmp_path / "inbox" / "SCAN0001.PDF", "scanner output")
    one_page_pdf(tmp_path / "inbox" / "2023" / "report.pdf", "copper")
    one_page_pdf(tmp_path / "inbox" / "2024" / "report.Pdf", "aluminium")
    (tmp_path / "inbox" / "notes.txt").write_text("not a pdf")
    named = [(p.relative_to(tmp_path).as_posix(), n) for p, n in _pdfs([str(tmp_path / "inbox")])]
    assert sorted(named) == [("inbox/2023/report.pdf", "2023/report.pdf"), ("inbox/2024/report.Pdf", "2024/report.Pdf"),
                             ("inbox/SCAN0001.PDF", "SCAN0001.PDF")]
    # a single file keeps its base name; two single files with one base name keep their given paths
    assert [n for _, n in _pdfs([str(tmp_path / "inbox" / "SCAN0001.PDF")])] == ["SCAN0001.PDF"]
    one_page_pdf(tmp_path / "inbox" / "2024" / "report.pdf", "aluminium again")
    both = [n for _, n in _pdfs([str(tmp_path / "inbox/2023/report.pdf"), str(tmp_path / "inbox/2024/report.pdf"),
                                 str(tmp_path / "inbox/SCAN0001.PDF")])]
    assert both == ["2023/report.pdf", "2024/report.pdf", "SCAN0001.PDF"]


def test_same_base_name_in_two_folders_is_two_documents_and_same_bytes_are_stored_once(app, tmp_path):
    for year, metal in (("2023", "copper"), ("2024", "aluminium")):
        (tmp_path / "reports" / year).mkdir(parents=True)
        one_page_pdf(tmp_path / "reports" / year / "report.pdf", f"Annual report {year}: the frame is {metal}.")
    (tmp_path / "reports" / "copy").mkdir()
    (tmp_path / "reports" / "copy" / "report-2023.pdf").write_bytes((tmp_path / "reports/2023/report.pdf").read_bytes())
    files = _pdfs([str(tmp_path / "reports")])
    results = app.library.ingest([f for f, _ in files], names=[n for _, n in files])
    assert {r.name: r.status for r in results} == {"2023/report.pdf": "added", "2024/report.pdf": "added",
                                                   "copy/report-2023.pdf": "unchanged"}
    assert sorted(d["doc"] for d in app.library.list()) == ["2023/report.pdf", "2024/report.pdf"]
    # a changed file at the same path replaces its older version, and only that one
    one_page_pdf(tmp_path / "reports" / "2024" / "report.pdf", "Annual report 2024, revised: the frame is steel.")
    files = _pdfs([str(tmp_path / "reports")])
    results = app.library.ingest([f for f, _ in files], names=[n for _, n in files])
    assert {r.name: r.status for r in results}["2024/report.pdf"] == "replaced"
    texts = sorted(d for ids, docs, _ in app.library.store.iter_items("text") for d in docs)
    assert texts == ["Annual report 2023: the frame is copper.", "Annual report 2024, revised: the frame is steel."]


# ---- no silent loss ----------------------------------------------------------------------------

def thin_strip_pdf(path):
    """The page's only image is 3000 x 1 px (a colour-scale legend), with a title, caption and text."""
    arr = np.zeros((1, 3000, 3), np.uint8)
    arr[0, :, 0] = np.linspace(0, 255, 3000).astype(np.uint8)
    arr[0, :, 2] = 255 - arr[0, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "Colour scale of the flood maps", fontsize=12)
    page.insert_image(pymupdf.Rect(72, 100, 540, 140), stream=buf.getvalue(), keep_proportion=False)
    page.insert_text((72, 170), "Figure 1: Colour scale from blue (low) to red (high).", fontsize=9)
    page.insert_textbox(pymupdf.Rect(72, 200, 540, 300), "Water levels were measured at forty gauges.", fontsize=10)
    doc.save(path)
    return path


def test_page_with_a_one_pixel_high_image_keeps_text_figure_and_page_image(app, tmp_path, cfg):
    pdf = thin_strip_pdf(tmp_path / "strip.pdf")
    [res] = app.library.ingest([pdf])
    seen = inspect_pdf(pdf, cfg["ingest"])
    assert res.status in ("added", "partial") and res.figures == 1 and res.chunks >= 1
    assert (res.figures, res.chunks) == (len(seen["figures"]), seen["chunks"])  # inspect and ingest agree
    [rec] = records(pdf, cfg)
    assert rec.png and rec.figures[0].png and rec.figures[0].caption.startswith("Figure 1: Colour scale")
    img = Image.open(io.BytesIO(rec.figures[0].png))
    assert img.width > 5 * img.height > 0  # the strip as the page shows it: wide, a few pixels high at least
    assert "forty gauges" in " ".join(c.text for c in rec.chunks)


def test_an_item_that_fails_is_left_out_with_a_warning_and_the_page_is_kept(app, tmp_path, monkeypatch):
    """Figure OCR failing on one image (here: the OCR engine raises for it) keeps the page's text,
    its page image and the figure itself; the result says what was lost, naming the page."""
    doc = pymupdf.open()
    for i in range(2):
        page = doc.new_page()
        page.insert_text((72, 72), f"Page {i + 1} body text about pumps.", fontsize=11)
        img = Image.new("RGB", (200, 150), (30 + 100 * i, 120, 60))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        page.insert_image(pymupdf.Rect(100, 120, 400, 345), stream=buf.getvalue())
    doc.save(tmp_path / "two.pdf")
    real_ocr = ingest.extract.ocr_lines
    calls = []

    def ocr_failing_on_page_2_figure(image, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cannot read this image")
        return real_ocr(image, *a, **k)

    monkeypatch.setattr(ingest.extract, "ocr_lines", ocr_failing_on_page_2_figure)
    [res] = app.library.ingest([tmp_path / "two.pdf"])
    assert len(calls) == 2
    assert res.status == "partial" and res.figures == 2 and res.chunks == 2
    assert res.warnings == ("page 2: figure 1: OCR could not read it, stored without its inner text "
                            "(cannot read this image)",)
    assert "partial" in res.message and "page 2: figure 1" in res.message
    kinds = sorted(m["kind"] for _, _, metas in app.library.store.iter_items("visual") for m in metas)
    assert kinds == ["page", "page", "raster", "raster"]


# ---- text normalised once, at extraction ---------------------------------------------------------

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def test_ligatures_soft_hyphens_zero_width_and_full_width_text_is_stored_and_found_plain(app, tmp_path, cfg):
    pages = [
        "Chapter 1. Installing the pump on a level floor.",
        "Chapter 2. The e\ufb03cient \ufb01lter keeps the \ufb02ow steady; main\u00adtenance is monthly.",
        "Chapter 3. Model \uff2d\uff38\uff15\uff10\uff10 (full-width) and zero\u200bwidth joins.",
    ]
    doc = pymupdf.open()
    for t in pages:
        page = doc.new_page()
        page.insert_font(fontname="dv", fontfile=DEJAVU)  # has the ligature glyphs
        font = "china-s" if "\uff2d" in t else "dv"  # a CJK font has the full-width forms
        page.insert_textbox(pymupdf.Rect(72, 72, 540, 200), t, fontname=font, fontsize=11)
    doc.save(tmp_path / "lig.pdf")
    text = {r.page: " ".join(c.text for c in r.chunks) for r in records(tmp_path / "lig.pdf", cfg, render=False)}
    assert "The efficient filter keeps the flow steady; maintenance is monthly." in text[2]
    assert "Model MX500 (full-width) and zerowidth joins." in text[3]
    app.library.ingest([tmp_path / "lig.pdf"])
    for query, page in (("efficient filter", 2), ("maintenance", 2), ("MX500", 3)):
        hits = app.retriever.retrieve(query, k=3, kinds=["text"], signals=["keyword"])
        assert hits and hits[0].page == page and hits[0].score > 0, query
