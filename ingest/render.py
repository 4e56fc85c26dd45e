"""A page of a stored PDF rendered as displayed, with boxes highlighted: what a citation opens.

Boxes are in the coordinates every box mmrag stores uses: the page as displayed (``/Rotate``
applied, relative to the CropBox), PDF points, top-left origin (``ingest.figures.display_rect``).
``page.get_pixmap`` renders that same space, so a box maps to pixels by the zoom alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pymupdf

from .errors import BadDocument
from .extract import open_pdf, render_zoom

HIGHLIGHT_RGB = (230, 0, 115)  # outline colour (a strong magenta, rare in documents)
FILL_ALPHA = 0.18  # the box's inside is tinted this much towards HIGHLIGHT_RGB
PAGE_MAX_PIXELS = 6_000_000  # a page view: ~2450 px a side for a square page, 2050 x 2900 for A4
MIN_DPI, MAX_DPI = 36.0, 600.0


def render_page(pdf_path: str | os.PathLike, page_number: int, boxes: Sequence[Sequence[float]] = (),
                dpi: float = 150.0, max_pixels: int = PAGE_MAX_PIXELS) -> bytes:
    """PNG bytes of page ``page_number`` (1-based) of the PDF at ``pdf_path``, rendered as a
    viewer shows it (rotation and CropBox applied, transparency on white) at ``dpi`` (clamped to
    36..600), scaled down to fit ``max_pixels``. Each box ``(x0, y0, x1, y1)`` (displayed-page
    PDF points, top-left origin; parts outside the page are cut off) is drawn as a thick
    ``HIGHLIGHT_RGB`` outline (about 2.5 pt, at least 3 px, centred on the box edge) over a
    light tint of its inside (``FILL_ALPHA``).

    Errors: ``BadDocument`` (the file cannot be opened), ``ValueError`` (no such page, or a box
    that is not four finite numbers).

    >>> import os, tempfile, pymupdf
    >>> doc = pymupdf.open(); page = doc.new_page(width=200, height=100)
    >>> path = os.path.join(tempfile.mkdtemp(), "one.pdf"); doc.save(path)
    >>> png = render_page(path, 1, [(50, 20, 150, 80)], dpi=144)
    >>> pix = pymupdf.Pixmap(png)
    >>> (pix.width, pix.height), pix.pixel(200, 40), pix.pixel(200, 100), pix.pixel(20, 20)
    ((400, 200), (230, 0, 115), (251, 209, 230), (255, 255, 255))
    """
    boxes = [_box(b) for b in boxes]
    if not math.isfinite(float(dpi)):
        raise ValueError(f"dpi must be a number, not {dpi}")
    doc = open_pdf(pdf_path, refuse_xfa=False)
    try:
        if not 1 <= int(page_number) <= doc.page_count:
            raise ValueError(f"page {page_number} is out of range: the document has {doc.page_count} page(s)")
        try:
            page = doc[int(page_number) - 1]
            rect = page.rect
            want = min(max(float(dpi), MIN_DPI), MAX_DPI) / 72.0
            zoom = render_zoom(rect.width, rect.height, want, max_pixels=max_pixels)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace=pymupdf.csRGB)
        except ValueError:
            raise
        except Exception as exc:  # MuPDF raises several types for broken pages
            raise BadDocument(f"page {page_number} cannot be rendered ({' '.join(str(exc).split())[:200]})") from None
        if not boxes:
            return pix.tobytes("png")
        img = np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.stride)[:, : pix.width * 3]
        img = img.reshape(pix.height, pix.width, 3).copy()
        sx, sy = pix.width / rect.width, pix.height / rect.height
        for x0, y0, x1, y1 in boxes:
            _highlight(img, ((x0 - rect.x0) * sx, (y0 - rect.y0) * sy, (x1 - rect.x0) * sx, (y1 - rect.y0) * sy),
                       max(3, round(2.5 * zoom)))
        out = pymupdf.Pixmap(pymupdf.csRGB, pix.width, pix.height, img.tobytes(), 0)
        return out.tobytes("png")
    finally:
        doc.close()


def _box(b) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(v) for v in b)
    except (TypeError, ValueError):
        raise ValueError(f"a box is four numbers x0, y0, x1, y1 (PDF points), not {b!r}"[:200]) from None
    if not all(np.isfinite((x0, y0, x1, y1))):
        raise ValueError("a box's coordinates must be finite numbers")
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _highlight(img: np.ndarray, box: tuple[float, float, float, float], width: int) -> None:
    """Tint the inside of ``box`` (pixels) and draw its outline ``width`` px thick, in place."""
    h, w = img.shape[:2]
    colour = np.array(HIGHLIGHT_RGB, np.float32)

    def clip(a: float, hi: int) -> int:
        return int(min(max(round(a), 0), hi))

    x0, y0, x1, y1 = clip(box[0], w), clip(box[1], h), clip(box[2], w), clip(box[3], h)
    inside = img[y0:y1, x0:x1]
    if inside.size:
        inside[:] = (inside * (1 - FILL_ALPHA) + colour * FILL_ALPHA).round().astype(np.uint8)
    half = width // 2
    ox0, oy0 = clip(box[0] - half, w), clip(box[1] - half, h)
    ox1, oy1 = clip(box[2] + width - half, w), clip(box[3] + width - half, h)
    ix0, iy0 = clip(box[0] + width - half, w), clip(box[1] + width - half, h)
    ix1, iy1 = clip(box[2] - half, w), clip(box[3] - half, h)
    for ys, xs in ((slice(oy0, iy0), slice(ox0, ox1)), (slice(iy1, oy1), slice(ox0, ox1)),
                   (slice(oy0, oy1), slice(ox0, ix0)), (slice(oy0, oy1), slice(ix1, ox1))):
        img[ys, xs] = HIGHLIGHT_RGB
