"""PDFs made by the tests with PyMuPDF: known figures, captions, text layouts and defects."""

from __future__ import annotations

import io
from pathlib import Path

import pymupdf
from PIL import Image

LOREM = ("Figures explain what words cannot. This paragraph is body text that wraps over several lines "
         "so that the page has a realistic text layer around its figures and tables. ")


def vector_figure(page: pymupdf.Page, rect: pymupdf.Rect, labels=("start", "end")) -> None:
    """A small diagram: two labelled boxes joined by an arrow, plus many tiny tick marks."""
    w = rect.width
    a = pymupdf.Rect(rect.x0, rect.y0 + 20, rect.x0 + w * 0.3, rect.y0 + 60)
    b = pymupdf.Rect(rect.x1 - w * 0.3, rect.y0 + 20, rect.x1, rect.y0 + 60)
    shape = page.new_shape()
    shape.draw_rect(a)
    shape.draw_rect(b)
    shape.draw_line((a.x1, a.y0 + 20), (b.x0, b.y0 + 20))
    shape.draw_circle((rect.x0 + w / 2, rect.y1 - 30), 25)
    for i in range(30):  # many small shapes that must stay one figure
        x = rect.x0 + i * w / 30
        shape.draw_line((x, rect.y1 - 4), (x, rect.y1))
    shape.finish(color=(0, 0, 0.6), width=1)
    shape.commit()
    page.insert_text((a.x0 + 5, a.y0 + 25), labels[0], fontsize=9)
    page.insert_text((b.x0 + 5, b.y0 + 25), labels[1], fontsize=9)


def ruled_table(page: pymupdf.Page, rect: pymupdf.Rect, rows: int = 5, cols: int = 3) -> None:
    shape = page.new_shape()
    h = rect.height / rows
    for r in range(rows + 1):
        shape.draw_line((rect.x0, rect.y0 + r * h), (rect.x1, rect.y0 + r * h))
    for c in range(cols + 1):
        x = rect.x0 + c * rect.width / cols
        shape.draw_line((x, rect.y0), (x, rect.y1))
    shape.finish(color=(0, 0, 0), width=0.5)
    shape.commit()
    for r in range(rows):
        for c in range(cols):
            page.insert_text((rect.x0 + c * rect.width / cols + 4, rect.y0 + r * h + h * 0.7), f"cell {r}{c} value",
                             fontsize=8)


def png_bytes(color=(200, 30, 30), size=(120, 90), mode="RGB") -> bytes:
    img = Image.new(mode, size, color)
    for x in range(size[0]):  # a diagonal stripe so the image is not flat
        img.putpixel((x, min(size[1] - 1, x * size[1] // size[0])), (0, 0, 0) if mode == "RGB" else 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def figure_doc(path: Path, pages: int = 3) -> Path:
    """Pages with: a vector figure + caption (p.1), a raster image placed twice + caption (p.2),
    a ruled table + caption (p.3); running header and page numbers on every page."""
    doc = pymupdf.open()
    for i in range(pages):
        page = doc.new_page()
        page.insert_text((72, 30), "mmrag test manual — running header", fontsize=8)
        page.insert_text((300, 780), str(i + 1), fontsize=8)
        page.insert_textbox(pymupdf.Rect(72, 60, 540, 160), LOREM * 3, fontsize=10)
        if i % 3 == 0:
            vector_figure(page, pymupdf.Rect(150, 200, 450, 380), labels=("parser", "renderer"))
            page.insert_text((150, 400), f"Figure {i + 1}: The parser feeds the renderer.", fontsize=10)
        elif i % 3 == 1:
            data = png_bytes()
            page.insert_image(pymupdf.Rect(100, 200, 280, 335), stream=data)
            page.insert_image(pymupdf.Rect(320, 200, 500, 335), stream=data)
            page.insert_text((100, 360), f"Fig. {i + 1}. Two copies of the same red image.", fontsize=10)
        else:
            ruled_table(page, pymupdf.Rect(100, 200, 500, 330))
            page.insert_text((100, 190), f"Table {i + 1}: Values in a ruled table", fontsize=10)
        page.insert_textbox(pymupdf.Rect(72, 450, 540, 700), LOREM * 4, fontsize=10)
    doc.save(path)
    return path


def scanned_doc(path: Path, lines=("The quick scanner reads this sentence.", "Second line about polar plots.")) -> Path:
    """One image-only page: text rendered into a picture, no text layer."""
    src = pymupdf.open()
    page = src.new_page()
    y = 100
    for line in lines:
        page.insert_text((72, y), line, fontsize=16)
        y += 30
    shape = page.new_shape()
    shape.draw_rect(pymupdf.Rect(150, 300, 450, 500))
    shape.draw_line((150, 500), (450, 300))
    shape.draw_circle((300, 400), 50)
    shape.finish(color=(0, 0, 0), width=2)
    shape.commit()
    pix = page.get_pixmap(dpi=150)
    out = pymupdf.open()
    p2 = out.new_page(width=page.rect.width, height=page.rect.height)
    p2.insert_image(p2.rect, stream=pix.tobytes("jpeg"))
    out.save(path)
    return path


def nested_forms(path: Path, depth: int = 30, text: int = 0) -> Path:
    """One page whose drawing never finishes: form XObject n draws form n-1 twice, so the page
    draws its leaf 2**depth times (a 4 kB file; depth 30 is a billion leaves). ``text``: characters
    the leaf writes, which MuPDF's text extraction keeps, so memory grows while it runs (~170 MB/s
    with 400); 0: the leaf is one line, memory stays flat."""
    font = "<< /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >>"
    doc = pymupdf.open()
    page = doc.new_page()
    leaf = doc.get_new_xref()
    doc.update_object(leaf, f"<< /Type /XObject /Subtype /Form /BBox [0 0 600 800] /Resources << /Font {font} >> >>")
    doc.update_stream(leaf, b"0 0 m 10 10 l S" + (b" BT /F1 4 Tf 1 1 Td (" + b"x" * text + b") Tj ET" if text else b""))
    prev = leaf
    for _ in range(depth):
        form = doc.get_new_xref()
        doc.update_object(form, "<< /Type /XObject /Subtype /Form /BBox [0 0 600 800] "
                                f"/Resources << /XObject << /X {prev} 0 R >> >> >>")
        doc.update_stream(form, b"q 1 0 0 1 0 0 cm /X Do Q q 1 0 0 1 1 1 cm /X Do Q")
        prev = form
    doc.xref_set_key(page.xref, "Resources", f"<< /Font {font} /XObject << /Top {prev} 0 R >> >>")
    contents = doc.get_new_xref()
    doc.update_object(contents, "<< >>")
    doc.update_stream(contents, b"BT /F1 11 Tf 72 720 Td (A page that never finishes drawing.) Tj ET q /Top Do Q")
    doc.xref_set_key(page.xref, "Contents", f"{contents} 0 R")
    doc.save(path, garbage=1, deflate=True)
    return path


SANS = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # Debian's fonts-dejavu-core (PyMuPDF embeds it)


def drop_unicode_maps(path: Path, out: Path) -> Path:
    """A copy of ``path`` whose fonts lose their ToUnicode maps, as some producers write them:
    an embedded TrueType font set Identity-H then reads as its glyph numbers ("7KH" for "The")."""
    doc = pymupdf.open(path)
    for xref in range(1, doc.xref_length()):
        if doc.xref_get_key(xref, "ToUnicode")[0] != "null":
            doc.xref_set_key(xref, "ToUnicode", "null")
    doc.save(out)
    return out



def outlined(page: pymupdf.Page) -> pymupdf.Document:
    """A one-page PDF that shows ``page`` with its text drawn as glyph outlines (filled paths) and
    no text layer, as design tools and some exports write posters and slides ("convert fonts to
    curves"): through MuPDF's SVG writer and reader."""
    svg = pymupdf.open("svg", page.get_svg_image(text_as_path=True).encode())
    return pymupdf.open("pdf", svg.convert_to_pdf())
