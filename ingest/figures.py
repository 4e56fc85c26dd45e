"""Figures on a page: raster images and vector drawings as one ink grid, captions, labels, tables."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pymupdf

from . import regions
from .text import normalise_text
from .records import BBox

CAPTION = re.compile(r"^\s*(fig(?:ure)?|table|tab|chart|diagram|plate|exhibit)\.?\s*([0-9]+[0-9.\-]*|[IVXL]+)\b", re.I)
JOIN_GAP = 6.0  # points: ink closer than this is one figure
BACKGROUND = 0.8  # share of the page: larger items are page backgrounds, larger regions are pages


@dataclass
class Candidate:
    bbox: BBox
    kind: str  # raster | vector | table
    xref: int = 0  # the one image that makes up a raster figure
    labels: str = ""  # text inside the figure (text layer, or OCR on scans)
    zoom: float = 0.0  # pixels per point that show its images at their own resolution (0: none)
    clip: BBox | None = None  # the area to render when it is not the box (a lone image's exact rect)


def page_lines(words: list[tuple]) -> list[tuple[str, BBox]]:
    """Group PyMuPDF words (x0, y0, x1, y1, word, block, line, wno) into text lines."""
    lines: dict[tuple[int, int], list[tuple]] = {}
    for w in words:
        lines.setdefault((w[5], w[6]), []).append(w)
    out = []
    for ws in lines.values():
        out.append((normalise_text(" ".join(w[4] for w in ws)), (min(w[0] for w in ws), min(w[1] for w in ws),
                                                  max(w[2] for w in ws), max(w[3] for w in ws))))
    return out


def display_rect(page: pymupdf.Page, r) -> pymupdf.Rect:
    """A rect from PyMuPDF's text, bbox-log, image and drawing APIs (unrotated page space, already
    relative to the CropBox) in the coordinates of the page as displayed (``page.rect``): the
    space of every box mmrag stores and of ``get_pixmap(clip=...)``."""
    r = pymupdf.Rect(r)
    return r * page.rotation_matrix if page.rotation else r


def display_drawings(page: pymupdf.Page) -> list[dict]:
    """``page.get_drawings()`` with rects and points in displayed-page coordinates."""
    drawings = page.get_drawings()
    if not page.rotation:
        return drawings
    m = page.rotation_matrix
    for d in drawings:
        d["rect"] = pymupdf.Rect(d["rect"]) * m
        d["items"] = [(it[0], *[(x * m if isinstance(x, (pymupdf.Point, pymupdf.Rect, pymupdf.Quad)) else x)
                                for x in it[1:]]) for it in d["items"]]
    return drawings


def native_zoom(info: dict) -> float:
    """Pixels per point at which a placed image shows its own resolution: its pixel size over
    the length of its placed sides (from the placement matrix, so rotation and shear count).

    >>> native_zoom({"width": 120, "height": 90, "transform": (180, 0, 0, 135, 100, 200)})
    0.6666666666666666
    >>> native_zoom({"width": 300, "height": 200, "transform": (0, 300, -200, 0, 350, 100)})  # rotated 90°
    1.0
    """
    a, b, c, d = info["transform"][:4]
    sx, sy = (a * a + b * b) ** 0.5, (c * c + d * d) ** 0.5
    return max(info["width"] / sx if sx else 0.0, info["height"] / sy if sy else 0.0)


def _ink_items(page: pymupdf.Page, skip_xrefs: set[int]) -> list[tuple[BBox, str, int, float]]:
    """(box in displayed coordinates, "path" | "image", image xref, image native zoom)."""
    page_area = abs(page.rect)
    items: list[tuple[BBox, str, int, float]] = []
    for kind, rect in page.get_bboxlog():
        if kind in ("fill-path", "stroke-path"):
            r = display_rect(page, rect) & page.rect
            if not r.is_empty and abs(r) < BACKGROUND * page_area:
                items.append((tuple(r), "path", 0, 0.0))
    for info in page.get_image_info(xrefs=True):
        r = display_rect(page, info["bbox"]) & page.rect
        if r.is_empty or info.get("xref", 0) in skip_xrefs or abs(r) >= BACKGROUND * page_area:
            continue
        try:
            zoom = native_zoom(info)
        except (KeyError, TypeError, ValueError):
            zoom = 0.0
        items.append((tuple(r), "image", info.get("xref", 0), zoom))
    return items


def _merge_overlapping(cands: list[Candidate]) -> list[Candidate]:
    merged = True
    while merged:
        merged = False
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                a, b = cands[i], cands[j]
                if regions.intersection(a.bbox, b.bbox) > 0.1 * min(regions.area(a.bbox), regions.area(b.bbox)):
                    kind = a.kind if a.kind == b.kind else ("raster" if "raster" in (a.kind, b.kind) else "vector")
                    cands[i] = Candidate(regions.union(a.bbox, b.bbox), kind, 0, zoom=max(a.zoom, b.zoom))
                    del cands[j]
                    merged = True
                    break
            if merged:
                break
    return cands


MAX_TABLE_ITEMS = 3000  # pages with more drawing items than this are plots, not tables


def rule_stats(drawings: list[dict], box: BBox) -> tuple[int, int, int, int]:
    """(segments, axis-aligned rule segments, full-width horizontal rules, vertical rules) of the
    drawings centred in ``box``. Unfilled rectangles count as four rules; filled ones (bars) and
    curves count as non-rules."""
    segs = rules = wide = vert = 0
    width = box[2] - box[0]
    for d in drawings:
        r = d["rect"]
        if not (box[0] <= (r.x0 + r.x1) / 2 <= box[2] and box[1] <= (r.y0 + r.y1) / 2 <= box[3]):
            continue
        for item in d["items"]:
            segs += 1
            if item[0] == "l":
                (x0, y0), (x1, y1) = item[1], item[2]
                if abs(y1 - y0) < 1:
                    rules += 1
                    wide += abs(x1 - x0) >= 0.6 * width
                elif abs(x1 - x0) < 1:
                    rules += 1
                    vert += 1
            elif item[0] == "re":
                rect = item[1]
                thin = min(rect.width, rect.height) <= 1.5
                if thin or d.get("fill") is None:
                    rules += 1
                    wide += rect.width >= 0.6 * width and (thin or d.get("fill") is None)
                    vert += rect.height > rect.width or not thin
    return segs, rules, wide, vert


def _text_area(box: BBox, lines: list[tuple[str, BBox]]) -> float:
    return sum(regions.intersection(box, lb) for _, lb in lines)


def find_figures(page: pymupdf.Page, lines: list[tuple[str, BBox]], skip_xrefs: set[int],
                 min_side: float) -> list[Candidate]:
    """Figure regions of a born-digital page, in reading order."""
    items = _ink_items(page, skip_xrefs)
    if not items:
        return []
    size = (page.rect.width, page.rect.height)
    grid = regions.paint(size, [it[0] for it in items])
    cands: list[Candidate] = []
    typed = [(it[0], it[1]) for it in items]
    drawings = None  # fetched only when a region might be a table
    for box in regions.ink_regions(grid, JOIN_GAP):
        grown = regions.grow_with_labels(box, lines)
        reg = regions.describe(box, typed)
        if reg.images:
            # the images of the region decide its kind; a lone image keeps its xref
            kind = "raster" if reg.image_area >= 0.3 * regions.area(box) else "vector"
        elif reg.n_paths == 0:
            continue
        else:
            kind = "vector"
        w, h = grown[2] - grown[0], grown[3] - grown[1]
        if w < min_side or h < min_side or w * h >= BACKGROUND * size[0] * size[1]:
            continue
        text_area = _text_area(grown, lines)
        if kind == "vector" and text_area >= 0.08 * regions.area(grown) and len(items) <= MAX_TABLE_ITEMS:
            drawings = drawings if drawings is not None else display_drawings(page)
            if regions.looks_like_table(*rule_stats(drawings, box)):
                kind = "table"
        elif kind == "vector" and reg.n_paths <= 2 and text_area >= 0.25 * regions.area(grown):
            continue  # a frame around text (a boxed note or listing), not a figure
        xref, clip = 0, None
        zoom = max((items[i][3] for i in reg.images), default=0.0)
        if kind == "raster" and len(reg.images) == 1:
            img_rect, _, img_xref, _ = items[reg.images[0]]
            if regions.intersection(img_rect, grown) >= 0.9 * regions.area(grown):
                xref, clip = img_xref, img_rect
        cands.append(Candidate(grown, kind, xref, zoom=zoom, clip=clip))
    cands = _merge_overlapping(cands)
    cands.sort(key=lambda c: (round(c.bbox[1] / 10), c.bbox[0]))
    return cands


def find_scanned_figures(gray: np.ndarray, lines: list[tuple[str, BBox]], size: tuple[float, float],
                         min_side: float) -> list[Candidate]:
    """Figure regions on a scanned page: dark pixels that are not OCR'd text lines.

    ``gray`` is the page in grey at one pixel per grid cell (``regions.CELL`` points)."""
    ink = gray < 200
    for _, (x0, y0, x1, y1) in lines:
        r0, r1 = int(y0 / regions.CELL) - 1, int(y1 / regions.CELL) + 2
        c0, c1 = int(x0 / regions.CELL) - 1, int(x1 / regions.CELL) + 2
        ink[max(0, r0):r1, max(0, c0):c1] = False
    cands = []
    for box in regions.ink_regions(ink, JOIN_GAP):
        bw, bh = box[2] - box[0], box[3] - box[1]
        if bw < min_side or bh < min_side:
            continue
        grown = regions.grow_with_labels(box, lines)
        if (grown[2] - grown[0]) * (grown[3] - grown[1]) >= BACKGROUND * size[0] * size[1]:
            continue
        inside = [t for t, lb in lines if regions.intersection(grown, lb) >= 0.5 * (regions.area(lb) or 1)]
        cands.append(Candidate(grown, "raster", 0, " ".join(inside)))
    return _merge_overlapping(cands)


def find_caption(box: BBox, blocks: list[tuple[str, BBox]], reach: float = 48.0) -> str:
    """The caption block next to a figure: below it first, then above; it must start like
    'Figure 3:', 'Fig. 3.', 'Table 2' and overlap the figure horizontally."""
    below, above = [], []
    for text, b in blocks:
        slack = 0.25 * (box[2] - box[0])  # centred captions can be wider than the figure
        if min(box[2] + slack, b[2]) - max(box[0] - slack, b[0]) <= 0 or not CAPTION.match(text):
            continue
        if 0 <= b[1] - box[3] <= reach or (b[1] >= box[1] + 0.8 * (box[3] - box[1]) and b[1] - box[3] <= reach):
            below.append((b[1] - box[3], text))
        elif 0 <= box[1] - b[3] <= reach:
            above.append((box[1] - b[3], text))
    for side in (below, above):
        if side:
            return min(side)[1].strip()
    return ""


def nearby_text(box: BBox, blocks: list[tuple[str, BBox]], caption: str, reach: float = 72.0, limit: int = 400) -> str:
    """Text of the blocks just above and below (or beside) a figure, nearest first."""
    near = []
    for text, b in blocks:
        if text == caption or regions.intersection(box, b) >= 0.5 * (regions.area(b) or 1):
            continue
        d = regions.gap(box, b)
        if d <= reach:
            near.append((d, text))
    out = " ".join(t for _, t in sorted(near))
    return out[:limit]


def labels_inside(box: BBox, lines: list[tuple[str, BBox]]) -> str:
    return " ".join(t for t, lb in lines if regions.intersection(box, lb) >= 0.5 * (regions.area(lb) or 1))
