"""Kinds of real-world PDFs (see ../shared/realworld/): each test makes its own input with PyMuPDF
and asserts the value a user needs: which files and names, no silent loss, normalised text,
page geometry, images as the page shows them, captions, one figure per figure."""

import io
import re
import unicodedata

import numpy as np
import pymupdf
import pytest
from PIL import Image

import ingest.extract
import ingest.ocr
from ingest.extract import extract_pages, inspect_pdf, open_pdf
from mmrag.cli import _pdfs
from tests import pdfgen
from tests.conftest import eval_pdf


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


def test_folder_walk_follows_linked_folders_once_and_skips_macos_companions(tmp_path):
    """A library folder that links in a shared folder (symlink), with a link back up (a loop)
    and the ._name.pdf metadata files macOS leaves on shared drives (not PDFs)."""
    (tmp_path / "shared" / "manuals").mkdir(parents=True)
    one_page_pdf(tmp_path / "shared" / "manuals" / "pump.pdf", "pump manual")
    (tmp_path / "lib" / "2024").mkdir(parents=True)
    one_page_pdf(tmp_path / "lib" / "2024" / "report.pdf", "report")
    (tmp_path / "lib" / "2024" / "._report.pdf").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (tmp_path / "lib" / "manuals").symlink_to(tmp_path / "shared" / "manuals", target_is_directory=True)
    (tmp_path / "lib" / "2024" / "up").symlink_to(tmp_path / "lib", target_is_directory=True)
    named = [n for _, n in _pdfs([str(tmp_path / "lib")])]
    assert named == ["2024/report.pdf", "manuals/pump.pdf"]


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
    texts = sorted(t.text for batch in app.library.store.iter_items("text") for t in batch)
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


def test_an_item_that_fails_is_left_out_with_a_warning_and_the_page_is_kept(app, tmp_path):
    """Figure OCR failing on one image keeps the page's text, its page image and the figure
    itself; the result says what was lost, naming the page. The failure is real, in the
    extraction worker: the OCR engine cannot resize a 6000 x 40 px strip (aspect 150:1) to its
    detector's input (rapidocr's ResizeImgError); page 1's ordinary image is read."""
    doc = pymupdf.open()
    for i, (width, rect, size) in enumerate([(612, pymupdf.Rect(100, 120, 400, 345), (200, 150)),
                                             (6200, pymupdf.Rect(100, 120, 6100, 160), (6000, 40))]):
        page = doc.new_page(width=width, height=400)
        page.insert_text((72, 72), f"Page {i + 1} body text about pumps.", fontsize=11)
        arr = np.zeros((size[1], size[0], 3), np.uint8)
        arr[:, :, 1] = 120
        arr[:, ::7, 0] = 255
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        page.insert_image(rect, stream=buf.getvalue())
    doc.save(tmp_path / "two.pdf")
    [res] = app.library.ingest([tmp_path / "two.pdf"])
    assert res.status == "partial" and res.figures == 2 and res.chunks == 2
    assert res.warnings == ("page 2: figure 1: OCR could not read it, stored without its inner text "
                            "(ResizeImgError)",)
    assert "partial" in res.message and "page 2: figure 1" in res.message
    kinds = sorted(it.kind for batch in app.library.store.iter_items("visual") for it in batch)
    assert kinds == ["page", "page", "raster", "raster"]
    texts = sorted(t.text for batch in app.library.store.iter_items("text") for t in batch if t.kind == "text")
    assert texts == ["Page 1 body text about pumps.", "Page 2 body text about pumps."]


def test_ocr_that_buys_nothing_is_skipped(tmp_path, cfg, monkeypatch):
    """Figure OCR runs once per distinct image with ink: a screenshot placed again on the next
    page reuses what was read (its words are on both figures), a blank image is not read (no
    contrast, no text), a vector diagram never is (its words come from the text layer)."""
    from PIL import ImageDraw, ImageFont

    shot = Image.new("RGB", (420, 140), (255, 255, 255))
    ImageDraw.Draw(shot).text((20, 40), "VALVE 42 OPEN", fill=(0, 0, 0), font=ImageFont.truetype(DEJAVU, 40))
    blank = Image.new("RGB", (300, 200), (250, 250, 250))
    doc = pymupdf.open()
    for i in range(2):
        page = doc.new_page()
        page.insert_text((72, 60), f"Page {i + 1}: the control panel.", fontsize=11)
        page.insert_image(pymupdf.Rect(72, 100, 492, 240), stream=_png(shot))
        if i == 0:
            page.insert_image(pymupdf.Rect(72, 300, 372, 500), stream=_png(blank))
        else:
            pdfgen.vector_figure(page, pymupdf.Rect(72, 300, 472, 450))
    doc.save(tmp_path / "panel.pdf")
    read = []
    real = ingest.extract.ocr_lines

    def counted(image, *a, **k):
        read.append(Image.open(io.BytesIO(image)).size)
        return real(image, *a, **k)

    monkeypatch.setattr(ingest.extract, "ocr_lines", counted)
    recs = records(tmp_path / "panel.pdf", cfg)
    figs = [(r.page, f.kind, f.ocr_text) for r in recs for f in r.figures]
    assert len(read) == 1, read  # the screenshot, once
    shots = [t for page, kind, t in figs if kind == "raster" and "VALVE" in t]
    assert len(shots) == 2 and all("42" in t and "OPEN" in t for t in shots), figs
    assert sorted(kind for _, kind, _ in figs) == ["raster", "raster", "raster", "vector"]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


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


LANGUAGE_PAGES = {  # three pages a language, one topic a page; the question names a word of the middle one
    "korea": (["설치 방법: 장치를 평평한 곳에 놓고 전원을 연결하십시오.", "네트워크 설정: 메뉴를 열고 비밀번호를 입력하십시오.",
               "배터리 관리: 낮은 온도에서는 용량이 줄어듭니다."], "비밀번호"),
    "dv": (["Εγκατάσταση: τοποθετήστε τη συσκευή σε επίπεδη επιφάνεια.", "ΡΥΘΜΙΣΗ ΔΙΚΤΥΟΥ: ΕΙΣΑΓΕΤΕ ΤΟΝ ΚΩΔΙΚΟ ΠΡΟΣΒΑΣΗΣ.",
            "Μπαταρία: σε χαμηλή θερμοκρασία η χωρητικότητα μειώνεται."], "κωδικό πρόσβασης"),
    "japan": (["設置方法：本体を平らな場所に置き、電源を接続してください。", "ネットワーク設定：メニューを開き、パスワードを入力してください。",
               "バッテリーの手入れ：低温では容量が低下します。"], "パスワード"),
    "rtl-ar": (["التركيب ضع الجهاز على سطح مستو", "إعدادات الشبكة افتح القائمة وأدخل كلمة المرور",
                "البطارية تنخفض السعة في درجات الحرارة المنخفضة"], "كلمة المرور"),
    "rtl-he": (["התקנה הניחו את המכשיר על משטח ישר", "הגדרות רשת פתחו את התפריט והזינו את הסיסמה",
                "סוללה בטמפרטורה נמוכה הקיבולת יורדת"], "הסיסמה"),
}


def test_a_question_in_the_documents_language_finds_its_page_by_keyword(app, tmp_path):
    """Korean (spaced words that carry their particles: 비밀번호를), Greek in capitals without
    accents asked in lower case with them, Japanese, and Arabic and Hebrew drawn in visual order
    (left to right, as PDF producers draw right-to-left text): the keyword signal alone ranks
    the page holding the word first."""
    doc = pymupdf.open()
    for font, (pages, _) in LANGUAGE_PAGES.items():
        for t in pages:
            page = doc.new_page()
            page.insert_font(fontname="dv", fontfile=DEJAVU)
            rtl = font.startswith("rtl")
            page.insert_text((72, 100), t[::-1] if rtl else t, fontname="dv" if rtl else font, fontsize=11)
    doc.save(tmp_path / "languages.pdf")
    app.library.ingest([tmp_path / "languages.pdf"])
    for n, (font, (pages, question)) in enumerate(LANGUAGE_PAGES.items()):
        hits = app.retriever.retrieve(question, k=3, kinds=["text"], signals=["keyword"])
        assert hits and hits[0].page == 3 * n + 2 and hits[0].score > 0, (question, [(h.page, h.text) for h in hits])
        assert hits[0].text == unicodedata.normalize("NFKC", pages[1])  # stored as written, right-to-left text in logical order



def test_vertical_and_wrapped_chinese_is_stored_as_written_and_found_by_keyword(app, tmp_path):
    """Chinese and Japanese set vertically (a font with the Identity-V encoding: MuPDF gives one
    character a line) or wrapped over lines (no space at the break in the language): stored
    without spaces between the characters, so a question's two-character words match."""
    doc = pymupdf.open()
    pages = [("水泵安装说明书", "安装前检查电源"), ("水泵维修手册更换叶轮", "拆下泵壳后清洗"), ("电机保养指南", "定期润滑轴承")]
    for vertical, wrapped in pages:
        page = doc.new_page(width=612, height=792)
        page.insert_font(fontname="cjk", fontbuffer=pymupdf.Font("cjk").buffer)
        page.insert_text((300, 100), vertical, fontname="cjk", fontsize=16)
        page.insert_textbox(pymupdf.Rect(72, 500, 72 + 3.5 * 12, 600), wrapped, fontname="cjk", fontsize=12)
    for xref in range(1, doc.xref_length()):
        if doc.xref_get_key(xref, "Subtype")[1] == "/Type0":  # the same font, written top to bottom
            doc.xref_set_key(xref, "Encoding", "/Identity-V")
    doc.save(tmp_path / "vertical.pdf")
    app.library.ingest([tmp_path / "vertical.pdf"])
    texts = sorted(t.text for batch in app.library.store.iter_items("text") for t in batch)
    assert sorted(t for pair in pages for t in pair) == sorted(" ".join(texts).split()), texts
    for question, page in (("叶轮", 2), ("泵壳", 2), ("轴承", 3)):
        hits = app.retriever.retrieve(question, k=3, kinds=["text"], signals=["keyword"])
        assert hits and hits[0].page == page and hits[0].score > 0, (question, [(h.page, h.text) for h in hits])

TATEGAKI = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた事だけは記憶している。"


def test_vertical_japanese_columns_are_read_right_to_left(cfg, tmp_path):
    """Japanese set vertically (tategaki: a font with the Identity-V encoding, MuPDF line wmode 1)
    in four columns, drawn left column first as some producers do: the passage reads the
    columns from the right one to the left one, a sentence running on from one column to the
    next without a space, with the horizontal heading before it and the horizontal caption after;
    the page number is dropped. A horizontal Japanese page on the same font is read as before. A
    page of two vertical halves with a wide gutter reads the right half first."""
    cols = [TATEGAKI[i:i + 17] for i in range(0, len(TATEGAKI), 17)]
    assert len(cols) == 4 and cols[0].endswith("ど") and cols[1].startswith("こ")  # a word split over two columns
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_font(fontname="tate", fontbuffer=pymupdf.Font("cjk").buffer)
    for n in reversed(range(len(cols))):  # the rightmost column is the first to read
        page.insert_text((340 - 30 * n, 150), cols[n], fontname="tate", fontsize=20)
    page.insert_text((170, 90), "第一章 Chapter One: the cat speaks", fontname="japan", fontsize=14)
    page.insert_text((170, 520), "図1 Figure 1 caption set horizontally", fontname="japan", fontsize=11)
    page.insert_text((292, 815), "7", fontname="helv", fontsize=10)
    flat = "取扱説明書の第二版です。電源を入れる前に、付属の電源コードを本体の背面に接続してください。"
    doc.new_page(width=595, height=842).insert_textbox(pymupdf.Rect(72, 72, 300, 300), flat, fontname="japan", fontsize=12)
    spread = doc.new_page(width=595, height=842)  # two halves with a wide gutter, as a book's spread: the right half first
    spread.insert_font(fontname="tate", fontbuffer=pymupdf.Font("cjk").buffer)
    for n, x in enumerate((100, 124, 440, 464)):  # drawn left to right, read right to left
        spread.insert_text((x, 100), cols[3 - n], fontname="tate", fontsize=20)
    for xref, _, _, _, name, _ in doc[0].get_fonts():
        if name == "tate":  # only this font is written top to bottom
            doc.xref_set_key(xref, "Encoding", "/Identity-V")
    doc.save(tmp_path / "tategaki.pdf")
    recs = records(tmp_path / "tategaki.pdf", cfg, render=False)
    assert [c.text for c in recs[0].chunks] == [
        "第一章 Chapter One: the cat speaks " + TATEGAKI + " 図1 Figure 1 caption set horizontally"]
    assert [c.text for c in recs[1].chunks] == [flat]
    assert " ".join(c.text for c in recs[2].chunks) == cols[0] + cols[1] + " " + cols[2] + cols[3]


# ---- page geometry: every box, crop and render as the page is displayed -------------------------

def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), float)


def blue_share(png):
    a = pixels(png)
    return float(((a[..., 2] > 180) & (a[..., 0] < 100)).mean())


@pytest.mark.parametrize("rotation,crop", [(90, False), (180, False), (270, False), (90, True), (270, True), (0, True)])
def test_rotated_and_cropped_pages_give_boxes_and_images_as_displayed(tmp_path, cfg, rotation, crop):
    """Content placed so that it reads upright on screen: a title, a blue panel at a known place
    of the displayed page, its caption below. Boxes, caption and stored images must follow."""
    crop_box = pymupdf.Rect(30, 40, 582, 752)  # the displayed page is the CropBox, offset
    probe = pymupdf.open().new_page(width=612, height=792)
    if crop:
        probe.set_cropbox(crop_box)
    probe.set_rotation(rotation)
    m = probe.derotation_matrix  # displayed -> unrotated, CropBox-relative
    off = pymupdf.Point(crop_box.tl) if crop else pymupdf.Point(0, 0)
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)  # drawn unrotated and uncropped, then turned and cropped
    panel = pymupdf.Rect(300, 120, 500, 280)  # where the viewer shows it

    def text(x, y, s, size):
        page.insert_text(pymupdf.Point(x, y) * m + off, s, fontsize=size, rotate=rotation)

    text(72, 60, "Quarterly results overview", 14)
    text(72, 100, "Body text on the left side of the page.", 10)
    page.draw_rect(panel * m + (off.x, off.y, off.x, off.y), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
    text(300, 300, "Figure 1: Blue panel of the results.", 10)
    if crop:
        page.set_cropbox(crop_box)
    page.set_rotation(rotation)
    doc.save(tmp_path / "p.pdf")
    # the reference: where a viewer shows the panel, from the page rendered at 72 dpi (one pixel a point)
    pix = pymupdf.open(tmp_path / "p.pdf")[0].get_pixmap(dpi=72, alpha=False)
    shown = np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.width, 3)
    ys, xs = np.nonzero((shown[..., 2] > 180) & (shown[..., 0] < 100))
    assert all(abs(a - b) <= 2 for a, b in zip((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), panel))
    [rec] = records(tmp_path / "p.pdf", cfg)
    w, h = (612, 792) if not crop else (552, 712)
    assert rec.size == ((h, w) if rotation in (90, 270) else (w, h))
    [fig] = rec.figures
    assert all(abs(a - b) <= 4 for a, b in zip(fig.bbox, panel)), fig.bbox
    assert fig.caption == "Figure 1: Blue panel of the results."
    assert blue_share(fig.png) > 0.8
    body = [c for c in rec.chunks if "Body text" in c.text]
    assert body and body[0].bbox[0] < fig.bbox[0] and body[0].bbox[1] < fig.bbox[1]  # above left, as displayed
    page_img = Image.open(io.BytesIO(rec.png))
    assert page_img.size == (round(rec.size[0]), round(rec.size[1]))  # page_dpi 72: one pixel a point


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_image_placed_rotated_is_stored_as_the_page_shows_it(tmp_path, cfg, rotate):
    img = Image.new("RGB", (300, 200), "white")
    img.paste((220, 0, 0), (0, 0, 120, 80))  # red in the stored top-left corner
    img.paste((0, 0, 200), (200, 150, 300, 200))  # blue in the stored bottom-right corner
    buf = io.BytesIO()
    img.save(buf, "PNG")
    doc = pymupdf.open()
    page = doc.new_page()
    rect = pymupdf.Rect(150, 100, 350, 400) if rotate != 180 else pymupdf.Rect(100, 100, 400, 300)
    page.insert_image(rect, stream=buf.getvalue(), rotate=rotate)
    page.insert_text((150, 430), "Figure 1: The pump housing.", fontsize=10)
    doc.save(tmp_path / "r.pdf")
    [rec] = records(tmp_path / "r.pdf", cfg)
    [fig] = rec.figures
    # where the red block is on the page (independent of MuPDF): rotate the stored pixels as placed
    shown = img.rotate(rotate, expand=True)  # PIL turns counter-clockwise, as PDF's rotate does
    stored = Image.open(io.BytesIO(fig.png)).convert("RGB").resize(shown.size)
    diff = np.abs(np.asarray(stored, float) - np.asarray(shown, float)).mean()
    assert diff < 20, diff


def _placed(tmp_path, pix=None, stream=None, after=None):
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "A page with one image.")
    page.insert_image(pymupdf.Rect(100, 100, 300, 250), pixmap=pix, stream=stream)
    if after:
        after(doc, page.get_images()[0][0])
    doc.save(tmp_path / "img.pdf")
    return tmp_path / "img.pdf"


def test_transparent_line_art_reaches_the_models_as_dark_lines_on_white(tmp_path, cfg, app):
    """A PNG with alpha whose transparent pixels are black (how drawing tools export line art):
    the stored PNG, what CLIP embeds and what the vision model is sent look like the page."""
    from PIL import ImageDraw

    im = Image.new("RGBA", (400, 300), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((40, 40, 360, 260), outline=(0, 0, 0, 255), width=6)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    pdf = _placed(tmp_path, stream=buf.getvalue())
    [rec] = records(pdf, cfg)
    grey = pixels(rec.figures[0].png).mean(axis=2)
    assert (grey < 128).mean() < 0.2 and (grey < 128).mean() > 0.01  # thin dark lines on white
    app.library.ingest([pdf])
    [item] = [it for batch in app.library.store.iter_items("visual") for it in batch if it.kind == "raster"]
    stored = np.asarray(Image.open(app.library.images.path(item.image)).convert("L"), float)
    assert (stored < 128).mean() < 0.2


def test_decode_array_cmyk_and_stencil_mask_images_come_out_as_shown(tmp_path, cfg):
    # an 8-bit grey image with /Decode [1 0]: a viewer shows it inverted (dark stays dark only if inverted twice)
    g = pymupdf.Pixmap(pymupdf.csGRAY, pymupdf.IRect(0, 0, 80, 60), False)
    g.set_rect(g.irect, (20,))  # stored nearly black
    pdf = _placed(tmp_path, pix=g, after=lambda d, x: d.xref_set_key(x, "Decode", "[1 0]"))
    [rec] = records(pdf, cfg)
    assert pixels(rec.figures[0].png).mean() > 200  # shown nearly white
    cmyk = pymupdf.Pixmap(pymupdf.csCMYK, pymupdf.IRect(0, 0, 80, 60), False)
    cmyk.set_rect(cmyk.irect, (0, 255, 255, 0))  # pure red in CMYK
    [rec] = records(_placed(tmp_path, pix=cmyk), cfg)
    r, g_, b = pixels(rec.figures[0].png).mean(axis=(0, 1))
    assert r > 200 and g_ < 60 and b < 60


def test_huge_and_tiny_pages_render_within_the_pixel_budget(tmp_path, cfg):
    doc = pymupdf.open()
    big = doc.new_page(width=14400, height=14400)  # the largest page PDF allows (200 inches)
    big.insert_text((720, 720), "Site plan of the whole campus.", fontsize=200)
    big.draw_rect(pymupdf.Rect(2000, 2000, 9000, 9000), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
    big.insert_text((2000, 9250), "Figure 1: The campus.", fontsize=200)
    tiny = doc.new_page(width=20, height=10)  # a label-sized page
    tiny.insert_text((1, 8), "tag", fontsize=6)
    doc.save(tmp_path / "sizes.pdf")
    recs = records(tmp_path / "sizes.pdf", cfg)
    assert [r.warnings for r in recs] == [(), ()]
    page_img = Image.open(io.BytesIO(recs[0].png))
    assert page_img.width * page_img.height <= ingest.extract.MAX_RENDER_PIXELS and page_img.width >= 1000
    [fig] = recs[0].figures
    fig_img = Image.open(io.BytesIO(fig.png))
    assert fig_img.width * fig_img.height <= ingest.extract.MAX_RENDER_PIXELS and blue_share(fig.png) > 0.8
    assert fig.caption == "Figure 1: The campus."
    assert Image.open(io.BytesIO(recs[1].png)).size == (20, 10)
    assert "tag" in recs[1].chunks[0].text


# ---- captions ------------------------------------------------------------------------------------

def ruled_table(page, y0, rows, label):
    x0, x1, xm = 100, 500, 300
    page.draw_line((x0, y0), (x1, y0), width=1)
    for r in range(rows):
        y = y0 + 18 * (r + 1)
        page.insert_text((x0 + 5, y - 5), f"{label} sample {r + 1}", fontsize=9)
        page.insert_text((xm + 5, y - 5), f"{(r + 1) * 3.5:.1f} kg", fontsize=9)
        page.draw_line((x0, y), (x1, y), width=0.5 if r < rows - 1 else 1)
    for x in (x0, xm, x1):
        page.draw_line((x, y0), (x, y0 + 18 * rows), width=0.5)
    return y0 + 18 * rows


def test_each_caption_goes_to_one_figure_above_below_or_beside(tmp_path, cfg):
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_text((100, 100), "Table 1: Masses of the first batch.", fontsize=10)
    end = ruled_table(page, 110, 4, "First")
    page.insert_text((100, end + 30), "Table 2: Masses of the second batch.", fontsize=10)
    ruled_table(page, end + 40, 4, "Second")  # its caption sits 30 pt below table 1 and 10 pt above table 2
    # a drawing with a short caption just under it (must not be pulled into the box)
    page.draw_rect(pymupdf.Rect(100, 360, 260, 470), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
    page.insert_text((100, 482), "Fig. 3. Pump.", fontsize=9)
    # a drawing with its caption beside it, on the right
    page.draw_circle((180, 600), 50, color=(0, 0, 0), fill=(0.9, 0.4, 0.2))
    page.insert_text((250, 600), "Figure 4: Valve seen from above.", fontsize=9)
    doc.save(tmp_path / "c.pdf")
    figs = sorted(inspect_pdf(tmp_path / "c.pdf", cfg["ingest"])["figures"], key=lambda f: f["bbox"][1])
    assert [(f["kind"], f["caption"]) for f in figs] == [
        ("table", "Table 1: Masses of the first batch."), ("table", "Table 2: Masses of the second batch."),
        ("vector", "Fig. 3. Pump."), ("vector", "Figure 4: Valve seen from above.")]
    assert figs[2]["bbox"][3] <= 474  # the caption line (y 474-484) is not part of the figure's box
    assert figs[3]["bbox"][2] < 250  # nor is the caption beside it (x from 250)


def test_a_caption_ends_where_its_paragraph_ends(tmp_path, cfg):
    """Body text set tight under a caption (same leading, no paragraph gap) is not part of it:
    under a short centred caption the body is wider; under a caption as wide as the column the
    caption's last line is short (the next word would have fitted). A caption that wraps keeps
    all its lines, also when paragraphs indent their first line."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    body = "Body text of the manual runs here across the whole column width, right up to the margin"
    page.draw_rect(pymupdf.Rect(200, 80, 400, 200), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
    page.insert_text((255, 212), "Figure 1: Pump.", fontsize=9)  # centred, short
    for i in range(2):
        page.insert_text((72, 223 + 11 * i), body, fontsize=9)
    page.draw_circle((300, 330), 50, color=(0, 0, 0), fill=(0.9, 0.4, 0.2))
    wrapped = ["Figure 2: The valve seen from above, with its inlet on the left and the outlet on the",
               "right, drawn to scale."]  # as wide as the column, then a short last line
    tight = "The body paragraph that follows is set as wide as the caption above it."
    assert pymupdf.get_text_length(tight, fontsize=9) <= pymupdf.get_text_length(wrapped[0], fontsize=9)
    for i, line in enumerate(wrapped + [tight, tight]):
        page.insert_text((72, 400 + 11 * i), line, fontsize=9)
    # texinfo style: paragraphs' first lines indented 15 pt, a caption without a closing period
    page.draw_rect(pymupdf.Rect(200, 500, 400, 600), color=(0, 0, 0), fill=(0.3, 0.7, 0.3))
    indented = ["Figure 3: Delaunay triangulation (blue lines) and Voronoi diagram (red lines) of a",
                "random set of points"]
    para = ["Additional information about the size of the facets of a Voronoi diagram, and which",
            "points of a set of points is in a polygon can be had with the polyarea function."]
    for i, line in enumerate(indented + para):
        page.insert_text((87 if i in (0, 2) else 72, 615 + 11 * i), line, fontsize=9)
    doc.save(tmp_path / "tight.pdf")
    figs = sorted(inspect_pdf(tmp_path / "tight.pdf", cfg["ingest"])["figures"], key=lambda f: f["bbox"][1])
    assert [f["caption"] for f in figs] == ["Figure 1: Pump.", " ".join(wrapped), " ".join(indented)]


CAPTION_STYLES = ["Figure 3 \u2013 Pump seen from the side.", "FIG. 3 PUMP SEEN FROM THE SIDE", "Fig 3: Pump.",
                  "Figure S1: Supplementary view.", "Figure A.1: Appendix view.", "Fig. 3a: Pump detail.",
                  "Supplementary Figure 2: Pump.", "Photo 3: The pump.", "Abbildung 3: Pumpe von der Seite.",
                  "Abb. 3: Pumpe.", "Tabelle 2: Massen.", "Figura 3: Bomba vista de lado.", "Tableau 2 : Masses.",
                  "\u0420\u0438\u0441. 3. \u041d\u0430\u0441\u043e\u0441.",
                  "\u0422\u0430\u0431\u043b\u0438\u0446\u0430 2 \u2014 \u041c\u0430\u0441\u0441\u0430.",
                  "\u56fe3 \u6c34\u6cf5", "\u8868 2 \u8d28\u91cf", "\u56f3 3 \u30dd\u30f3\u30d7", "\uadf8\ub9bc 3. \ud38c\ud504"]


def test_captions_in_other_styles_and_languages_are_found(tmp_path, cfg):
    """A figure per page, its caption below in one of the styles and languages real documents
    use (dash after the number, upper case, supplementary and appendix numbers, sub-figure
    letters, German, Spanish, French, Russian, Chinese, Japanese, Korean labels)."""
    doc = pymupdf.open()
    for cap in CAPTION_STYLES:
        page = doc.new_page()
        page.insert_font(fontname="dv", fontfile=DEJAVU)
        page.insert_text((72, 72), "Body text on this page, a paragraph of the manual.", fontsize=10, fontname="dv")
        page.draw_rect(pymupdf.Rect(100, 120, 300, 260), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
        cjk = [c for c in cap if ord(c) > 0x2E80]
        font = ("korea" if any(0xAC00 <= ord(c) <= 0xD7AF for c in cjk) else "japan" if "\u56f3" in cjk
                else "china-s" if cjk else "dv")
        page.insert_text((100, 275), cap, fontsize=10, fontname=font)
    doc.save(tmp_path / "styles.pdf")
    figs = inspect_pdf(tmp_path / "styles.pdf", cfg["ingest"])["figures"]
    assert [(f["page"], f["caption"]) for f in figs] == list(enumerate(CAPTION_STYLES, 1))


def test_a_label_line_takes_its_caption_text(tmp_path, cfg):
    """A caption label on a line of its own, its text on the next, wider line: 'TABLE I'
    centred over the title (IEEE papers) and 'Figure 3' under a drawing."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_text((72, 60), "Safety instructions for the pump", fontsize=14)
    page.insert_text((100, 372), "Figure 2: Caption of the valve.", fontsize=10)
    page.insert_text((72, 80), "Read them before the first start.", fontsize=10)
    page.insert_text((280, 100), "TABLE I", fontsize=9)
    page.insert_text((190, 111), "MASSES OF THE FIRST BATCH OF PARTS", fontsize=9)
    ruled_table(page, 120, 4, "First")
    page.draw_rect(pymupdf.Rect(100, 230, 300, 360), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
    page.draw_rect(pymupdf.Rect(100, 420, 300, 560), color=(0, 0, 0), fill=(0.9, 0.4, 0.2))
    page.insert_text((185, 575), "Figure 3", fontsize=10)
    page.insert_text((100, 588), "The pump seen from the side, with its inlet.", fontsize=10)
    doc.save(tmp_path / "labels.pdf")
    rec = records(tmp_path / "labels.pdf", cfg, render=False)[0]
    assert sorted((f.kind, f.caption) for f in rec.figures) == [
        ("table", "TABLE I MASSES OF THE FIRST BATCH OF PARTS"), ("vector", "Figure 2: Caption of the valve."),
        ("vector", "Figure 3 The pump seen from the side, with its inlet.")]


# ---- one figure, one region -----------------------------------------------------------------------

def test_parts_of_one_figure_are_one_region_with_its_caption(tmp_path, cfg):
    doc = pymupdf.open()
    # p.1: two panels side by side, 20 pt apart, one caption under both
    page = doc.new_page()
    page.insert_textbox(pymupdf.Rect(72, 60, 540, 110), "Body text before the figure. " * 5, fontsize=10)
    page.draw_rect(pymupdf.Rect(100, 150, 280, 300), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
    page.draw_rect(pymupdf.Rect(300, 150, 480, 300), color=(0, 0, 0), fill=(0.9, 0.4, 0.2))
    page.insert_text((180, 320), "Figure 1: (a) before and (b) after the repair.", fontsize=10)
    # p.2: a drawing and its dimension arrow 16 pt below it
    page = doc.new_page()
    page.draw_rect(pymupdf.Rect(150, 150, 450, 300), color=(0, 0, 0), width=2)
    page.draw_line((150, 316), (450, 316), width=1)
    for x, dx in ((150, 6), (450, -6)):
        page.draw_polyline([(x + dx, 312), (x, 316), (x + dx, 320)], width=1)
    page.insert_text((280, 330), "300 mm", fontsize=8)
    page.insert_text((150, 350), "Figure 2: Housing with its width.", fontsize=10)
    # p.3: a row of four small examples, 15 pt apart, one caption; then two figures with their own captions
    page = doc.new_page()
    for i in range(4):
        x = 100 + i * 95
        page.draw_circle((x + 40, 160), 35, color=(0, 0, 0), fill=(0.1 * i, 0.5, 0.5))
    page.insert_text((100, 215), "Figure 3: Four marker styles.", fontsize=10)
    page.draw_rect(pymupdf.Rect(100, 300, 280, 420), color=(0, 0, 0), fill=(0.3, 0.3, 0.8))
    page.draw_rect(pymupdf.Rect(300, 300, 480, 420), color=(0, 0, 0), fill=(0.8, 0.3, 0.3))
    page.insert_text((100, 435), "Figure 4: Left unit.", fontsize=10)
    page.insert_text((300, 435), "Figure 5: Right unit.", fontsize=10)
    # p.4: a row of five small line-width examples, 20 pt apart, that one code example (no caption) describes
    page = doc.new_page()
    for i in range(5):
        x = 90 + i * 100
        page.draw_rect(pymupdf.Rect(x, 170, x + 80, 230), color=(0, 0, 0), fill=(0.2 * i, 0.3, 0.6), width=1 + i / 2)
    for j, code in enumerate(["\\draw[->] (0,0) -- (1,0);  % styles 1-5, left to right",
                              "\\draw[-{Stealth[length=3mm]}] (0,0) -- (1,0);"]):
        page.insert_text((90, 260 + 12 * j), code, fontsize=9, fontname="cour")
    doc.save(tmp_path / "parts.pdf")
    figs = inspect_pdf(tmp_path / "parts.pdf", cfg["ingest"])["figures"]
    row = [f for f in figs if f["page"] == 4]
    assert len(row) == 1 and row[0]["bbox"][0] <= 92 and row[0]["bbox"][2] >= 568, row  # one figure, all five
    figs = [f for f in figs if f["page"] != 4]
    got = [(f["page"], f["caption"], [round(v) for v in f["bbox"]]) for f in figs]
    assert [(p, c) for p, c, _ in got] == [
        (1, "Figure 1: (a) before and (b) after the repair."), (2, "Figure 2: Housing with its width."),
        (3, "Figure 3: Four marker styles."), (3, "Figure 4: Left unit."), (3, "Figure 5: Right unit.")], got
    box = {c[:8]: b for _, c, b in got}
    assert box["Figure 1"][0] <= 102 and box["Figure 1"][2] >= 478  # both panels
    assert box["Figure 2"][3] >= 318  # the drawing and its arrow
    assert box["Figure 3"][0] <= 102 and box["Figure 3"][2] >= 418  # all four examples
    assert box["Figure 4"][2] <= 290 and box["Figure 5"][0] >= 290


def test_each_figure_of_a_scanned_page_is_its_own_region(tmp_path, cfg):
    src = pymupdf.open()
    page = src.new_page()
    page.insert_text((72, 80), "Inspection report, scanned.", fontsize=14)
    page.draw_rect(pymupdf.Rect(80, 150, 260, 300), color=(0, 0, 0), width=3)  # a tree on the left
    page.draw_polyline([(170, 160), (100, 290), (240, 290), (170, 160)], color=(0, 0, 0), width=3)
    page.draw_circle((430, 225), 70, color=(0, 0, 0), width=3)  # a wheel on the right
    page.insert_text((72, 360), "Body text under both pictures describes the site.", fontsize=12)
    pix = page.get_pixmap(dpi=150)
    doc = pymupdf.open()
    scan = doc.new_page(width=page.rect.width, height=page.rect.height)
    scan.insert_image(scan.rect, stream=pix.tobytes("png"))
    doc.save(tmp_path / "scan.pdf")
    [rec] = records(tmp_path / "scan.pdf", cfg, render=False)
    assert rec.scanned
    boxes = sorted(f.bbox for f in rec.figures)
    assert len(boxes) == 2, boxes
    assert boxes[0][0] <= 82 and boxes[0][2] <= 270 and boxes[1][0] >= 350 and boxes[1][2] >= 498


def ocr_layer_scan(doc, draw):
    """Add to ``doc`` a page as OCR tools leave a scan: the page ``draw`` makes, rendered to a
    150 dpi image that covers the page, with each word of its text written over it invisibly
    (render mode 3) at the word's place and size (what ocrmypdf and Acrobat's 'searchable image' write)."""
    src = pymupdf.open()
    page = src.new_page(width=612, height=792)
    draw(page)
    words = []
    for block in page.get_text("rawdict")["blocks"]:
        for line in block.get("lines", []):
            for span in line["spans"]:
                word, x0 = "", 0.0
                for ch in span["chars"] + [{"c": " "}]:
                    if ch["c"] == " ":
                        if word:
                            words.append((x0, span["chars"][0]["origin"][1], word, span["size"]))
                        word = ""
                    else:
                        x0 = ch["origin"][0] if not word else x0
                        word += ch["c"]
    scan = doc.new_page(width=612, height=792)
    scan.insert_image(scan.rect, stream=page.get_pixmap(dpi=150).tobytes("png"), keep_proportion=False)
    for x, y, word, size in words:
        scan.insert_text((x, y), word, fontsize=size, render_mode=3)


def test_figures_of_a_scan_with_an_invisible_text_layer_are_found(tmp_path, cfg):
    """An OCR'd scan: its text comes from the invisible text layer, its figures from the scan's
    pixels (the page's drawing commands hold one image covering the page); a page of text alone
    has none."""
    def with_figure(page):
        page.insert_text((72, 80), "Inspection report of the pumping station.", fontsize=14)
        page.draw_rect(pymupdf.Rect(100, 150, 400, 350), color=(0, 0, 0), width=3)
        page.draw_circle((250, 250), 60, color=(0, 0, 0), fill=(0.5, 0.5, 0.5))
        page.insert_text((100, 370), "Figure 1: Cross-section of the impeller housing.", fontsize=11)
        page.insert_text((72, 420), "The valve was replaced in March and the seals were checked.", fontsize=12)

    def text_only(page):
        page.insert_textbox(pymupdf.Rect(72, 72, 540, 400), "Maintenance log of the second pump. " * 12, fontsize=12)

    doc = pymupdf.open()
    ocr_layer_scan(doc, with_figure)
    ocr_layer_scan(doc, text_only)
    # not a scan: a born-digital page over a paper-texture picture, its text visible, a ruled table
    page = doc.new_page(width=612, height=792)
    page.insert_image(page.rect, stream=_png(Image.new("RGB", (60, 80), (240, 235, 220))), keep_proportion=False)
    page.insert_text((100, 100), "Table 1: Masses of the first batch.", fontsize=10)
    ruled_table(page, 110, 4, "First")
    doc.save(tmp_path / "ocrd.pdf")
    first, second, third = records(tmp_path / "ocrd.pdf", cfg, render=False)
    assert [(f.kind, f.caption) for f in third.figures] == [("table", "Table 1: Masses of the first batch.")]
    [fig] = first.figures
    assert all(abs(a - b) <= 4 for a, b in zip(fig.bbox, (98.5, 148.5, 401.5, 351.5))), fig.bbox
    assert fig.caption == "Figure 1: Cross-section of the impeller housing."
    assert "valve was replaced in March" in " ".join(c.text for c in first.chunks)
    assert second.figures == [] and "Maintenance log of the second pump." in second.chunks[0].text


def test_a_scan_stored_as_strips_on_grey_paper_is_read_like_one_scan(tmp_path, cfg):
    """Scanners and JBIG2 encoders often store a page as several image strips placed edge to
    edge: together they are the scan (OCR'd, its figure found), while two photos apart from each
    other on a page without text (a collage) stay two figures. The scan is of grey paper (a
    photocopy, recycled paper: grey 184), where ink is what is darker than the paper."""
    src = pymupdf.open()
    page = src.new_page(width=612, height=792)
    page.draw_rect(page.rect, color=None, fill=(0.72, 0.72, 0.72))
    page.insert_text((72, 80), "Inspection report of the pumping station.", fontsize=14)
    page.draw_rect(pymupdf.Rect(100, 150, 400, 350), color=(0, 0, 0), width=3)
    page.insert_text((100, 370), "Figure 1: Cross-section of the impeller housing.", fontsize=11)
    page.insert_text((72, 420), "The valve was replaced in March and the seals were checked.", fontsize=12)
    pix = page.get_pixmap(dpi=150)
    scan = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    for i in range(4):
        h = scan.height // 4
        page.insert_image(pymupdf.Rect(0, 198 * i, 612, 198 * (i + 1)),
                          stream=_png(scan.crop((0, i * h, scan.width, (i + 1) * h))), keep_proportion=False)
    page = doc.new_page(width=612, height=792)
    for x0 in (20, 336):  # each 256 x 752 pt: 40 % of the page, 60 pt apart
        page.insert_image(pymupdf.Rect(x0, 20, x0 + 256, 772), stream=_png(Image.new("RGB", (60, 160), (40, 90, 160))),
                          keep_proportion=False)
    doc.save(tmp_path / "strips.pdf")
    strips, collage = records(tmp_path / "strips.pdf", cfg, render=False)
    assert strips.scanned and not collage.scanned
    text = " ".join(c.text for c in strips.chunks)
    assert "valve" in text and "March" in text and "pumping station" in text, text
    [fig] = strips.figures
    assert all(abs(a - b) <= 4 for a, b in zip(fig.bbox, (98.5, 148.5, 401.5, 351.5))), fig.bbox
    assert fig.caption.startswith("Figure 1: Cross")
    assert [f.kind for f in collage.figures] == ["raster", "raster"]


def test_a_scan_with_a_stamp_in_its_margin_is_still_read_by_ocr(tmp_path, cfg):
    """A scan with a visible Bates number added after scanning (legal productions, filed
    copies): the stamp is the page's only text layer, so the page is still a scan: OCR'd, its
    figure found in the pixels. The same picture with visible text in the body is not a scan."""
    src = pymupdf.open()
    page = src.new_page(width=612, height=792)
    page.insert_text((72, 80), "Inspection report of the pumping station.", fontsize=14)
    page.draw_rect(pymupdf.Rect(100, 150, 400, 350), color=(0, 0, 0), width=3)
    page.insert_text((100, 370), "Figure 1: Cross-section of the impeller housing.", fontsize=11)
    page.insert_text((72, 420), "The valve was replaced in March and the seals were checked.", fontsize=12)
    scan = page.get_pixmap(dpi=150).tobytes("png")
    doc = pymupdf.open()
    for body in ("", "Visible notes typed over the picture, in the body of the page."):
        page = doc.new_page(width=612, height=792)
        page.insert_image(page.rect, stream=scan, keep_proportion=False)
        page.insert_text((470, 775), "ACME-000123", fontsize=9)  # the stamp, bottom margin
        if body:
            page.insert_text((72, 600), body, fontsize=10)
    doc.save(tmp_path / "stamped.pdf")
    stamped, typed = records(tmp_path / "stamped.pdf", cfg, render=False)
    assert stamped.scanned and not typed.scanned
    text = " ".join(c.text for c in stamped.chunks)
    assert "valve" in text and "pumping station" in text, text
    [fig] = stamped.figures
    assert all(abs(a - b) <= 4 for a, b in zip(fig.bbox, (98.5, 148.5, 401.5, 351.5))), fig.bbox
    assert fig.caption.startswith("Figure 1: Cross")


def raw_image_pdf(path, image_dict: str, data: bytes, fill: str = "", place: str = "200 0 0 150 100 542"):
    """A page with one image XObject written by hand (what PyMuPDF's insert_image never writes:
    16-bit samples, an indexed palette, a stencil mask), placed at (100, 100, 300, 250)."""
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "A page with one hand-made image.")
    xref = doc.get_new_xref()
    doc.update_object(xref, f"<< /Type /XObject /Subtype /Image {image_dict} /Length 0 >>")
    doc.update_stream(xref, data)
    kind, res = doc.xref_get_key(page.xref, "Resources")
    if kind == "xref":
        doc.xref_set_key(int(res.split()[0]), "XObject", f"<< /Im1 {xref} 0 R >>")
    else:
        doc.xref_set_key(page.xref, "Resources/XObject", f"<< /Im1 {xref} 0 R >>")
    cont = page.get_contents()[0]
    doc.update_stream(cont, doc.xref_stream(cont) + f"\nq {fill} {place} cm /Im1 Do Q\n".encode())
    doc.save(path)
    return path


def halves(png):
    a = pixels(png)
    w = a.shape[1]
    return a[:, : w // 3].mean(axis=(0, 1)), a[:, 2 * w // 3:].mean(axis=(0, 1))


def test_sixteen_bit_indexed_and_stencil_mask_images_come_out_as_shown(tmp_path, cfg):
    # 16-bit grey, 8 x 2 px: left half white (0xFFFF), right half black
    row = b"\xff\xff" * 4 + b"\x00\x00" * 4
    pdf = raw_image_pdf(tmp_path / "g16.pdf", "/Width 8 /Height 2 /BitsPerComponent 16 /ColorSpace /DeviceGray", row * 2)
    left, right = halves(records(pdf, cfg)[0].figures[0].png)
    assert left.min() > 240 and right.max() < 15
    # indexed: a two-colour palette (red, blue), left half index 0, right half index 1
    pdf = raw_image_pdf(tmp_path / "idx.pdf", "/Width 8 /Height 2 /BitsPerComponent 8 "
                        "/ColorSpace [/Indexed /DeviceRGB 1 <C81E1E0000C8>]", (b"\x00" * 4 + b"\x01" * 4) * 2)
    left, right = halves(records(pdf, cfg)[0].figures[0].png)
    assert abs(left - (200, 30, 30)).max() < 10 and abs(right - (0, 0, 200)).max() < 10
    # a stencil mask painted green where its bit is 0 (/Decode [0 1]); elsewhere the paper shows
    pdf = raw_image_pdf(tmp_path / "mask.pdf", "/Width 8 /Height 2 /BitsPerComponent 1 /ImageMask true "
                        "/Decode [0 1]", b"\x0f\x0f", fill="0 0.6 0 rg")
    left, right = halves(records(pdf, cfg)[0].figures[0].png)
    assert abs(left - (0, 153, 0)).max() < 10 and right.min() > 240


def test_image_placed_flipped_is_stored_as_the_page_shows_it(tmp_path, cfg):
    """Left half red, right half blue in the stored pixels; the placement matrix mirrors it."""
    data = (b"\x00" * 4 + b"\x01" * 4) * 2
    cs = "/Width 8 /Height 2 /BitsPerComponent 8 /ColorSpace [/Indexed /DeviceRGB 1 <C81E1E0000C8>]"
    pdf = raw_image_pdf(tmp_path / "flip.pdf", cs, data, place="-200 0 0 150 300 542")  # mirrored left-right
    left, right = halves(records(pdf, cfg)[0].figures[0].png)
    assert abs(left - (0, 0, 200)).max() < 10 and abs(right - (200, 30, 30)).max() < 10


# ---- layout: columns --------------------------------------------------------------------------

def two_column_page(path, rows_first):
    """A two-column page (Letter, 10 pt text, columns 54-290 and 322-558) whose text is drawn row
    by row across the columns (``rows_first``, as some report generators and Word exports do) or
    column by column; a figure spanning both columns with its caption below; a figure in the
    left column with its caption beside it in the right one."""
    import textwrap

    left = textwrap.wrap(" ".join(f"alder{i} pump housing" for i in range(80)), 44)
    right = textwrap.wrap(" ".join(f"birch{i} motor shaft" for i in range(80)), 44)
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    bands = [(60, left[:12], right[:12]), (400, left[12:20], right[12:20])]
    for y0, ls, rs in bands:
        pairs = list(zip(ls, rs))
        order = [(i, 0) for i in range(len(pairs))] + [(i, 1) for i in range(len(pairs))]
        for i, col in (sorted(order) if rows_first else order):
            page.insert_text((54 if col == 0 else 322, y0 + 12 * i), pairs[i][col], fontsize=10)
    page.draw_rect(pymupdf.Rect(54, 220, 558, 360), color=(0, 0, 0), fill=(0.2, 0.4, 0.9))
    page.insert_text((200, 376), "Figure 1: Blue panel across both columns.", fontsize=9)
    page.draw_rect(pymupdf.Rect(54, 520, 290, 700), color=(0, 0, 0), fill=(0.9, 0.4, 0.2))
    page.insert_text((322, 610), "Figure 2: Orange panel in the left column.", fontsize=9)
    doc.save(path)
    return left[:20], right[:20]


@pytest.mark.parametrize("rows_first", [True, False])
def test_two_column_text_is_read_column_by_column_and_figures_keep_their_captions(tmp_path, cfg, rows_first):
    left, right = two_column_page(tmp_path / "cols.pdf", rows_first)
    rec = records(tmp_path / "cols.pdf", cfg, render=False)[0]
    # the passages, overlaps removed: each band's left column, then its right column, line after line
    words = " ".join(c.text for c in rec.chunks).split()
    seen = [w for n, w in enumerate(words) if w[:5] in ("alder", "birch") and w not in words[:n]]
    want = [w for part in (left[:12], right[:12], left[12:], right[12:]) for w in
            " ".join(part).split() if w[:5] in ("alder", "birch")]
    assert seen == want
    assert sorted((f.bbox, f.caption) for f in rec.figures) == [
        ((52.0, 218.0, 560.0, 362.0), "Figure 1: Blue panel across both columns."),
        ((52.0, 518.0, 292.0, 702.0), "Figure 2: Orange panel in the left column.")]


# ---- images under a clip path -------------------------------------------------------------------

def test_an_image_placed_larger_than_its_clip_is_the_part_the_page_shows(tmp_path, cfg):
    """A photo cropped in a layout program: the whole image is embedded, placed larger than its
    frame, and a clip path shows one part of it. The figure's box and stored image are that part."""
    arr = np.full((400, 400, 3), (30, 30, 220), np.uint8)
    arr[:200, :200] = (220, 30, 30)  # the top-left quarter, the only part the frame shows, is red
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_image(pymupdf.Rect(0, 0, 1, 1), stream=buf.getvalue())
    name = page.get_images(full=True)[0][7]
    # frame: x 100-250, y 100-250 in the displayed page (PDF y 542-692); image at x 50-450, y 50-450
    doc.update_stream(page.get_contents()[0], f"q 100 542 150 150 re W n q 400 0 0 400 50 342 cm /{name} Do Q Q\n".encode())
    page.insert_text((100, 266), "Figure 1: The cropped photo.", fontsize=9)
    doc.save(tmp_path / "clip.pdf")
    rec = records(tmp_path / "clip.pdf", cfg)[0]
    assert len(rec.figures) == 1
    fig = rec.figures[0]
    assert all(abs(a - b) <= 3 for a, b in zip(fig.bbox, (100, 100, 250, 250))), fig.bbox
    assert fig.caption == "Figure 1: The cropped photo."
    px = np.asarray(Image.open(io.BytesIO(fig.png)).convert("RGB").resize((32, 32))).reshape(-1, 3).astype(int)
    red = ((px[:, 0] > 180) & (px[:, 2] < 90)).mean()
    assert red > 0.85, f"stored image is not the red visible quarter (red share {red:.2f})"


# ---- text a reader cannot see -------------------------------------------------------------------

def test_white_transparent_and_covered_text_is_not_indexed_but_white_text_on_a_banner_is(tmp_path, cfg):
    """White text on white paper (hidden keyword lists, template leftovers), fully transparent
    text, and text under a box drawn over it (a redaction done with a black box, a white-out)
    are not what a reader sees: not stored. White text on a dark banner and text under a
    see-through highlight are, and stay."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_text((72, 72), "Pump maintenance schedule for the spring.", fontsize=11)
    page.insert_text((72, 100), "hidden keywords marmoset ocelot", fontsize=11, color=(1, 1, 1))
    page.insert_text((300, 72), "invisible draft note", fontsize=11, fill_opacity=0)
    page.draw_rect(pymupdf.Rect(60, 140, 552, 170), color=None, fill=(0.1, 0.2, 0.5))
    page.insert_text((72, 160), "Safety notice: stop the pump first.", fontsize=11, color=(1, 1, 1))
    page.insert_text((72, 200), "Replace the gasket and", fontsize=11)
    page.insert_text((196, 200), "white words inside a line", fontsize=11, color=(0.97, 0.97, 0.97))
    page.insert_text((72, 214), "check the seal.", fontsize=11)
    # a redaction done by drawing a black box over the text (the text is still in the file), a
    # white-out box over a line, and a see-through highlight over a line that is read
    page.insert_text((72, 300), "Claimant: Jonathan Quigley-Barnes", fontsize=11)
    page.draw_rect(pymupdf.Rect(124, 288, 260, 304), color=None, fill=(0, 0, 0))
    page.insert_text((72, 340), "Obsolete paragraph about asbestos seals.", fontsize=11)
    page.draw_rect(pymupdf.Rect(70, 328, 330, 344), color=None, fill=(1, 1, 1))
    page.insert_text((72, 380), "Torque the bolts to 40 Nm.", fontsize=11)
    page.draw_rect(pymupdf.Rect(70, 368, 220, 384), color=None, fill=(1, 1, 0), fill_opacity=0.4)
    # white labels on light banners (yellow, light green: in grey, barely lighter than white)
    banners = []
    for n, (fill, size) in enumerate([(f, z) for f in ((1, 1, 0), (0.6, 1, 0.6)) for z in (8, 10, 12)]):
        y = 420 + 40 * n
        page.draw_rect(pymupdf.Rect(60, y - 20, 552, y + 8), color=None, fill=fill)
        banners.append(f"Banner {n} label: wear gloves.")
        page.insert_text((72, y), banners[-1], fontsize=size, color=(1, 1, 1))
    doc.save(tmp_path / "white.pdf")
    rec = records(tmp_path / "white.pdf", cfg, render=False)[0]
    text = " ".join([c.text for c in rec.chunks] + [f.ocr_text for f in rec.figures])
    for hidden in ("marmoset", "ocelot", "invisible", "draft", "white words", "Quigley", "asbestos"):
        assert hidden not in text, text
    for shown in ("Pump maintenance schedule", "Safety notice: stop the pump first.", "Replace the gasket and", "check the seal.",
                  "Claimant:", "Torque the bolts to 40 Nm.", *banners):
        assert shown in text, text


def test_a_filled_square_annotation_hides_text_but_an_unapplied_redact_annotation_does_not(tmp_path, cfg):
    """Annotations count as the viewer draws them: a filled Square annotation over a name hides
    it like a drawn box; a Redact annotation only marked (not applied) shows the text outlined,
    and the text stays searchable until the redaction is applied."""
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "Claimant: Jonathan Quigley-Barnes", fontsize=11)
    box = page.add_rect_annot(pymupdf.Rect(124, 60, 260, 76))
    box.set_colors(stroke=(0, 0, 0), fill=(0, 0, 0))
    box.update()
    page.insert_text((72, 120), "Secret code ZEBRA-99 here", fontsize=11)
    page.add_redact_annot(pymupdf.Rect(130, 108, 200, 124), fill=(0, 0, 0))
    doc.save(tmp_path / "annots.pdf")
    rec = records(tmp_path / "annots.pdf", cfg, render=False)[0]
    text = " ".join([c.text for c in rec.chunks] + [f.ocr_text for f in rec.figures])
    assert "Claimant:" in text and "Quigley" not in text, text
    assert "ZEBRA-99" in text, text


def test_an_invisible_ocr_layer_over_a_faint_scan_is_all_searchable(tmp_path, cfg):
    """An OCR layer (invisible render mode 3, or fully transparent text) over a scan whose ink is
    faint (light grey, small print) is the page's text: every word of it is kept, however little
    contrast the scan shows under it."""
    words = "The seal kit number is QX-4471 and the torque is forty newton metres today".split()
    source = pymupdf.open()
    page = source.new_page(width=612, height=792)
    page.insert_text((72, 100), " ".join(words), fontsize=6, color=(0.85, 0.85, 0.85))
    scan = page.get_pixmap(dpi=150).tobytes("png")
    doc = pymupdf.open()
    for invisible in ({"render_mode": 3}, {"fill_opacity": 0}):
        page = doc.new_page(width=612, height=792)
        page.insert_image(page.rect, stream=scan, keep_proportion=False)
        page.insert_text((72, 100), " ".join(words), fontsize=6, **invisible)
        # the same page with its serial number redacted by a black box drawn over scan and layer
        page = doc.new_page(width=612, height=792)
        page.insert_image(page.rect, stream=scan, keep_proportion=False)
        page.insert_text((72, 100), " ".join(words), fontsize=6, **invisible)
        serial = page.search_for("QX-4471")[0]
        page.draw_rect(serial + (-1, -1, 1, 1), color=None, fill=(0, 0, 0))
    doc.save(tmp_path / "faint.pdf")
    for rec in records(tmp_path / "faint.pdf", cfg, render=False):
        text = " ".join(c.text for c in rec.chunks).split()
        assert text == [w for w in words if rec.page % 2 or w != "QX-4471"], (rec.page, text)


def test_text_whose_font_maps_no_unicode_is_read_from_the_page_as_shown(tmp_path, cfg):
    """A font embedded Identity-H without a ToUnicode map (some PDF printers and office exports
    write them) reads as glyph numbers: "7KH\x03SUHVVXUH" for "The pressure". What the page shows
    is read by OCR instead, caption included, spaces or no spaces between the words; text in
    fonts that map, on the same page, is read once from the text layer. With OCR off the glyph
    numbers are left out, with a warning. A formula's lone unmapped brace (a real TeX manual) is
    no such text: its line stays as the text layer has it."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    sans = {"fontname": "F0", "fontfile": pdfgen.SANS, "fontsize": 12}
    page.insert_text((72, 100), "The pressure relief valve opens at nine bar.", **sans)
    page.insert_text((72, 120), "Check the seal every week.", **sans)
    page.insert_text((72, 160), "This line is set in plain Helvetica.", fontsize=12)
    # one line in two fonts, the unmapped one after and before a readable one
    page.insert_text((72, 190), "Warning:", fontsize=12)
    page.insert_text((132, 190), "do not open the valve under load.", **sans)
    page.insert_text((72, 210), "Maximum pressure at the relief valve:", fontsize=12)
    page.insert_text((292, 210), "nine", **sans)
    page.insert_text((330, 210), "bar.", fontsize=12)
    pdfgen.vector_figure(page, pymupdf.Rect(150, 240, 450, 380))
    page.insert_text((150, 400), "Figure 1: Relief valve cross section", **sans)
    page = doc.new_page(width=612, height=792)
    x = 72
    for word in "Torque the flange bolts crosswise".split():  # placed word by word: no space glyphs
        page.insert_text((x, 100), word, **sans)
        x += pymupdf.get_text_length(word, fontname="helv", fontsize=12) * 1.15 + 8
    doc.save(tmp_path / "mapped.pdf")
    pdfgen.drop_unicode_maps(tmp_path / "mapped.pdf", tmp_path / "glyphs.pdf")
    assert "7KH" in pymupdf.open(tmp_path / "glyphs.pdf")[0].get_text()  # the defect is there

    first, second = records(tmp_path / "glyphs.pdf", cfg, render=False)
    text = " ".join(c.text for c in first.chunks)
    assert re.search(r"The pressure relief valve opens at nine bar\. ?Check the seal every week\.", text), text
    assert text.count("This line is set in plain Helvetica.") == 1, text
    for line in ("Warning: do not open the valve under load.", "Maximum pressure at the relief valve: nine bar."):
        assert re.sub(r"\s", "", text).count(re.sub(r"\s", "", line)) == 1, (line, text)  # OCR may drop a space
    assert text.count("Warning") == 1 and text.count("Maximum") == 1 and not first.warnings, text
    assert "7KH" not in text and not re.search("[\x00-\x08\x0e-\x1f]", text), text
    assert [f.caption for f in first.figures] == ["Figure 1: Relief valve cross section"]
    assert "Torque the flange bolts crosswise" in " ".join(c.text for c in second.chunks)

    never = dict(cfg["ingest"], ocr="never")
    first, second = extract_pages(open_pdf(tmp_path / "glyphs.pdf"), "sha", never, render=False)
    text = " ".join(c.text for c in first.chunks + second.chunks)
    assert text == ("This line is set in plain Helvetica. Warning: Maximum pressure at the relief valve: bar."), text
    assert "maps no character to Unicode" in first.warnings[0] and "turn OCR on" in first.warnings[0]

    octave = open_pdf(eval_pdf("octave-p675-860.pdf"))
    skip, running = ingest.extract.document_context(octave)
    rec = ingest.extract.extract_page(octave, 99, "sha", cfg["ingest"], skip, running, {}, render=False)
    text = " ".join(c.text for c in rec.chunks)
    assert "is defined as s(⌈N/2⌉), N odd; (s(N/2) + s(N/2 + 1))/2, N even." in text, text
    assert {c.source for c in rec.chunks} == {"text"}


def test_text_drawn_as_outlines_is_read_by_ocr_and_a_page_of_drawing_only_keeps_its_figure(tmp_path, cfg):
    """A page whose text is drawn as glyph outlines, with no text layer (a poster or slide
    exported with fonts turned to curves), is a page without a text layer: read by OCR (what
    ``ocr: auto`` says), and its diagram is one figure with the box and caption it has when the
    text is real text; the outlined paragraphs are no figures. A page that is only a drawing,
    without any text, keeps its figure."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_text((72, 100), "Hydraulic pump service", fontsize=18)
    body = ["The pump delivers forty litres per minute at full speed.", "Replace the filter cartridge every six months."]
    for n, line in enumerate(body):
        page.insert_text((72, 140 + 16 * n), line, fontsize=11)
    pdfgen.vector_figure(page, pymupdf.Rect(150, 260, 450, 420))
    page.insert_text((150, 440), "Figure 1: Pump circuit overview", fontsize=10)
    doc.save(tmp_path / "text.pdf")
    curves = pdfgen.outlined(page)
    assert not curves[0].get_text().strip() and len(curves[0].get_drawings()) > 100  # no text layer, only paths
    drawing = curves.new_page(width=612, height=792)
    pdfgen.vector_figure(drawing, pymupdf.Rect(100, 100, 500, 300), labels=("", ""))
    curves.save(tmp_path / "curves.pdf")

    real = records(tmp_path / "text.pdf", cfg, render=False)[0]
    shown, only_drawing = records(tmp_path / "curves.pdf", cfg, render=False)
    assert not only_drawing.chunks and len(only_drawing.figures) == 1 and only_drawing.figures[0].kind == "vector"
    assert regions_overlap(only_drawing.figures[0].bbox, (100, 100, 500, 300)) >= 0.9
    text = " ".join(c.text for c in shown.chunks)
    assert "Hydraulic pump service" in text and all(line in text for line in body), text
    assert {c.source for c in shown.chunks} == {"ocr"}
    assert len(shown.figures) == 1, [(f.bbox, f.caption) for f in shown.figures]
    fig, ref = shown.figures[0], real.figures[0]
    assert all(abs(a - b) <= 4 for a, b in zip(fig.bbox, ref.bbox)), (fig.bbox, ref.bbox)
    assert re.sub(r"\s", "", fig.caption) == re.sub(r"\s", "", ref.caption) == "Figure1:Pumpcircuitoverview"
    assert fig.ocr_text.split() == ["start", "end"]


def regions_overlap(a, b) -> float:
    """The share of ``b`` that box ``a`` covers."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / ((b[2] - b[0]) * (b[3] - b[1]))


def test_a_scan_fed_in_sideways_or_upside_down_is_read_in_order_with_boxes_as_shown(tmp_path, cfg):
    """Scanners take pages in any way round: a page scanned upright, a quarter turn either way and
    upside down is read line by line in reading order, and its passage's box is where the text
    lies on the page as shown (the viewer's page, which citations highlight)."""
    src = pymupdf.open()
    page = src.new_page(width=612, height=792)
    said = ["The quick scanner reads this sentence.", "Second line about polar plots.",
            "Hydraulic pressure must stay below nine bar."]
    for n, line in enumerate(said):
        page.insert_text((72, 100 + 30 * n), line, fontsize=16)
    upright = Image.open(io.BytesIO(page.get_pixmap(dpi=150).tobytes("png")))
    text_box = (72, 85, 400, 165)  # points, on the upright page
    doc = pymupdf.open()
    for angle in (0, 90, 180, 270):  # counter-clockwise, as the scan lies on the page
        img = upright.rotate(angle, expand=True)
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        scan = doc.new_page(width=img.width * 72 / 150, height=img.height * 72 / 150)
        scan.insert_image(scan.rect, stream=buf.getvalue())
    doc.save(tmp_path / "turned.pdf")
    for rec, angle in zip(records(tmp_path / "turned.pdf", cfg, render=False), (0, 90, 180, 270)):
        assert rec.scanned and len(rec.chunks) == 1, (angle, rec.chunks)
        read = re.sub(r"\s", "", rec.chunks[0].text)
        assert read == "".join(re.sub(r"\s", "", line) for line in said), (angle, rec.chunks[0].text)
        want = ingest.ocr.turn_box(text_box, angle // 90, (612, 792))
        assert all(abs(a - b) <= 12 for a, b in zip(rec.chunks[0].bbox, want)), (angle, rec.chunks[0].bbox, want)


def test_a_failing_hidden_text_check_keeps_the_page_text_with_a_warning(tmp_path, cfg, monkeypatch):
    """The check for hidden text renders the page; when that fails (a page MuPDF cannot draw),
    the page's text is kept as extracted and the record says what was skipped."""
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "Pump maintenance schedule.", fontsize=11)
    page.insert_text((72, 100), "white words", fontsize=11, color=(1, 1, 1))
    doc.save(tmp_path / "w.pdf")

    def no_render(*a, **k):
        raise RuntimeError("cannot draw this page")

    monkeypatch.setattr(pymupdf.Page, "get_pixmap", no_render)
    rec = records(tmp_path / "w.pdf", cfg, render=False)[0]
    assert [c.text for c in rec.chunks] == ["Pump maintenance schedule. white words"]
    assert rec.warnings == ("page 1: the check for hidden text failed, all its text is kept (cannot draw this page)",)


def test_text_drawn_twice_in_one_place_is_read_once(tmp_path, cfg):
    """Fake bold (a line drawn twice a hair apart, as Word and printer drivers simulate bold), a
    heading drawn over its grey shadow, and a caption in fake bold are one line to a reader:
    stored once, so passages, captions and keyword counts are not doubled. Words a sentence
    really repeats ("had had", "la la") stay."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    for dx in (0, 0.4):
        page.insert_text((72 + dx, 72), "Safety Warning: disconnect the mains", fontsize=14)
    page.insert_text((73.5, 111.5), "Pump Overview", fontsize=20, color=(0.6, 0.6, 0.6))  # shadow
    page.insert_text((72, 110), "Pump Overview", fontsize=20)
    page.insert_text((72, 140), "The fitter had had the seal replaced; la la is not a model name.", fontsize=11)
    page.draw_rect(pymupdf.Rect(150, 200, 450, 400), color=(0, 0, 0), width=1.5)
    page.draw_line((160, 390), (440, 210), color=(0, 0, 1), width=2)
    for dx in (0, 0.3):
        page.insert_text((150 + dx, 420), "Figure 1: Flow rate against pump speed.", fontsize=10)
    doc.save(tmp_path / "bold.pdf")
    rec = records(tmp_path / "bold.pdf", cfg, render=False)[0]
    text = " ".join(c.text for c in rec.chunks)
    assert text.count("Safety") == 1 and text.count("mains") == 1, text
    assert text.count("Pump Overview") == 1, text
    assert "had had the seal replaced; la la is not" in text, text
    assert [f.caption for f in rec.figures] == ["Figure 1: Flow rate against pump speed."]


def test_a_filled_form_reads_as_shown_with_ticks_as_symbols(tmp_path, cfg):
    """A filled form (an inspection sheet) is read as the viewer shows it: the text fields'
    values, a ticked check box as the tick beside its label (ZapfDingbats codes read as their
    symbols, not a stray "4" or "3"), nothing for an unticked box, a FreeText note; a sticky
    note's popup text is not on the page and is not read."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_text((72, 72), "Serial number:", fontsize=11)
    field = pymupdf.Widget()
    field.field_type, field.field_name = pymupdf.PDF_WIDGET_TYPE_TEXT, "serial"
    field.rect, field.field_value = pymupdf.Rect(180, 60, 320, 76), "SN-44817-Q"
    page.add_widget(field)
    for n, (label, ticked) in enumerate([("Pressure test passed:", True), ("Leak found:", False),
                                         ("Seal replaced:", True)]):
        y = 110 + 30 * n
        page.insert_text((72, y), label, fontsize=11)
        box = pymupdf.Widget()
        box.field_type, box.field_name = pymupdf.PDF_WIDGET_TYPE_CHECKBOX, f"box{n}"
        box.rect, box.field_value = pymupdf.Rect(200, y - 12, 212, y), ticked
        page.add_widget(box)
    page.add_freetext_annot(pymupdf.Rect(72, 220, 400, 240), "Inspector note: recheck the flange in May.")
    page.add_text_annot((450, 72), "popup text the page does not show")
    doc.save(tmp_path / "form.pdf")
    rec = records(tmp_path / "form.pdf", cfg, render=False)[0]
    text = " ".join(c.text for c in rec.chunks)
    assert "Serial number: SN-44817-Q" in text, text
    assert re.search("Pressure test passed: [✓✔] Leak found: Seal replaced: [✓✔] Inspector", text), text
    assert "Inspector note: recheck the flange in May." in text, text
    assert "popup" not in text and not re.search(r"\b[3-8]\b", text), text
