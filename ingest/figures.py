"""Figures on a page: raster images and vector drawings as one ink grid, captions, labels, tables."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pymupdf

from . import regions
from .text import normalise_text
from .records import BBox

# The words that start a caption, in the languages of the documents users bring: English, German,
# French, Spanish/Portuguese/Italian, Dutch/Nordic, Polish/Czech, Turkish, Russian/Ukrainian, Greek,
# Chinese/Japanese/Korean, Vietnamese/Indonesian.
CAPTION_WORDS = (
    "fig(?:ure)?|table|tab|chart|diagram|plate|exhibit|photo(?:graph)?|listing"
    "|abbildung|abb|tabelle|bild|grafik|diagramm|tableau|graphique|sch[ée]ma|figura|tabla|tabela"
    "|tabella|cuadro|quadro|gr[áa]fico|imagen|imagem|figuur|afbeelding|tabel|figur|tabell|rysunek|rys|obr[áa]zek"
    "|obr|tabulka|wykres|[şs]ekil|tablo|рисунок|рис|таблица|таблиця|табл|схема|диаграмма|σχ[ήη]μα|εικ[όο]να"
    "|π[ίι]νακας|图|圖|表|図|그림|표|hình|bảng|gambar"
)
# label, then its number: 3, 3.2, 12-4, 3a, S1 (supplementary), A.1 (appendix), or Roman III
# (the prefix letters and Roman numerals in capitals only: 'Tablet2', 'Figure x' are not labels);
# the number ends at anything but a Latin letter or digit (so 图3水泵 and Figure 3: both match).
# Generic words (image, graph, plot, map, scheme, drawing) are left out: they start legends and
# body sentences ('Plot 1: measured', 'Image 2 shows') more often than captions.
CAPTION = re.compile(rf"^\s*(?:(?:supplementa(?:ry|l)|suppl\.?|extended\s+data)\s+)?({CAPTION_WORDS})\.?\s*"
                     r"((?-i:[A-Z]{1,2})[.\-]?[0-9]+(?:[.\-\u2013][0-9]+)*[a-z]?|[0-9]+(?:[.\-\u2013][0-9]+)*[a-z]?"
                     r"|(?-i:[IVXL]+))(?![0-9a-z])", re.I)
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
    """Group PyMuPDF words (x0, y0, x1, y1, word, block, line, wno) into text lines. A line with
    a wide gap (more than twice its height: two captions side by side, two columns) is split there."""
    lines: dict[tuple[int, int], list[tuple]] = {}
    for w in words:
        lines.setdefault((w[5], w[6]), []).append(w)
    out = []
    for ws in lines.values():
        parts = [[ws[0]]]
        for prev, w in zip(ws, ws[1:]):
            height = max(prev[3] - prev[1], w[3] - w[1], 1.0)
            if regions.gap(prev[:4], w[:4]) > 2 * height:
                parts.append([])
            parts[-1].append(w)
        for part in parts:
            out.append((normalise_text(" ".join(w[4] for w in part)), (min(w[0] for w in part), min(w[1] for w in part),
                                                                       max(w[2] for w in part), max(w[3] for w in part))))
    return out


def _ended_short(last: BBox, span: BBox, text: str, b: BBox) -> bool:
    """A line ``last`` ended its paragraph when the next line's first word (of ``text``, at
    ``b``) would have fitted in the room left before the right edge of ``span``: a line only
    wraps when the next word does not fit. The word's width is its share of the next line's.

    >>> _ended_short((90, 350, 189, 361), (90, 337, 522, 361), "Additional information here", (105, 366, 522, 377))
    True
    >>> _ended_short((90, 350, 500, 361), (90, 337, 522, 361), "Additional information here", (105, 366, 522, 377))
    False
    """
    words = text.split()
    if not words:
        return False
    word = (b[2] - b[0]) * (len(words[0]) + 1) / max(len(text), 1)
    return span[2] - last[2] > word


def caption_label(text: str) -> re.Match | None:
    """The caption label a line or block starts with (``CAPTION``), unless it starts in lower
    case: 'figure 3 of the appendix' is a wrapped body line, not a caption.

    >>> caption_label("Fig. 3a: Pump.").group(0), caption_label("figure 3 of the appendix")
    ('Fig. 3a', None)
    """
    m = CAPTION.match(text)
    return m if m and not m.group(0).lstrip()[:1].islower() else None


def _label_only(text: str) -> bool:
    """A caption line that is its label and number alone (the caption's text on the next line).

    >>> _label_only("TABLE I"), _label_only("Fig. 3."), _label_only("Figure 3: Pump.")
    (True, True, False)
    """
    m = caption_label(text)
    return bool(m) and not text[m.end():].strip(" .:\u2013\u2014-")


def caption_blocks(lines: list[tuple[str, BBox]], figures: list[BBox] = ()) -> list[tuple[str, BBox]]:
    """Captions as blocks: each line that starts like a caption, with the lines that continue
    it: just below, within the caption's width (a wrapped caption's lines are no wider than its
    first, give or take a first-line indent of up to three line heights), not a caption, not
    inside one of ``figures``, and not after a line that ended short (see ``_ended_short``). Body
    text set tight under a caption is not swallowed, born-digital or OCR'd alike. A first line
    that is the label alone ('TABLE I', centred over its title as IEEE papers set it) takes the
    next line whatever its width (so body text set tight under a bare 'Figure 2', with no
    paragraph gap, is read as its caption: the layout cannot tell them apart).

    >>> caption_blocks([("Figure 1: A long caption", (100, 100, 300, 110)), ("that wraps.", (100, 112, 160, 122)),
    ...                 ("Body text far below.", (100, 160, 300, 170))])
    [('Figure 1: A long caption that wraps.', (100, 100, 300, 122))]
    >>> caption_blocks([("Fig. 2: Pump.", (250, 100, 330, 110)), ("Body text set tight below it.", (90, 112, 520, 122))])
    [('Fig. 2: Pump.', (250, 100, 330, 110))]
    >>> caption_blocks([("Figure 3: A caption as wide as the", (90, 100, 520, 110)), ("column, ending.", (90, 112, 200, 122)),
    ...                 ("Body text.", (90, 124, 520, 134))])[0][0]
    'Figure 3: A caption as wide as the column, ending.'
    >>> caption_blocks([("TABLE I", (280, 100, 320, 110)), ("SIMULATION PARAMETERS OF THE PUMP", (200, 112, 400, 122))])
    [('TABLE I SIMULATION PARAMETERS OF THE PUMP', (200, 100, 400, 122))]
    """
    ordered = sorted(lines, key=lambda ln: (ln[1][1], ln[1][0]))
    out = []
    for i, (text, box) in enumerate(ordered):
        if not is_caption(text):
            continue
        parts, cur, last = [text.strip()], box, box
        for t, b in ordered[i + 1:]:
            if b[1] < last[3] - 0.5 * (b[3] - b[1]):
                continue  # level with the last line: beside it
            if b[1] - last[3] > 0.8 * max(last[3] - last[1], 1.0):
                break  # a paragraph gap: the caption ended
            h = max(last[3] - last[1], 1.0)
            inside = any(regions.intersection(f, b) >= 0.5 * (regions.area(b) or 1) for f in figures)
            if len(parts) == 1 and _label_only(parts[0]) and not is_caption(t) and not inside:
                pass  # 'TABLE I' / 'Figure 3' on a line of its own: the next line is its text, however wide
            elif (is_caption(t) or b[0] < cur[0] - 3 * h or b[2] > cur[2] + h  # wider than the caption: body text
                    or _ended_short(last, cur, t, b) or inside):
                break
            parts.append(t.strip())
            cur, last = regions.union(cur, b), b
        out.append((" ".join(parts), cur))
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


class _ImageClips(pymupdf.mupdf.FzDevice2):
    """A MuPDF device that records, for each image the page draws, its placement matrix and the
    box of the clip it is drawn under (None: unclipped). Only clip, mask and image calls reach
    Python; paths and text are not traced."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[pymupdf.Rect | None] = [None]
        self.images: list[tuple[tuple, pymupdf.Rect | None]] = []
        for name in ("clip_path", "clip_stroke_path", "clip_text", "clip_stroke_text", "clip_image_mask",
                     "pop_clip", "begin_mask", "fill_image", "fill_image_mask"):
            getattr(self, "use_virtual_" + name)()

    def _push(self, r) -> None:
        r, top = pymupdf.Rect(r.x0, r.y0, r.x1, r.y1), self.stack[-1]
        self.stack.append(r if top is None else r & top)

    def clip_path(self, ctx, path, even_odd, ctm, scissor):
        self._push(pymupdf.mupdf.ll_fz_bound_path(path, None, ctm))

    def clip_stroke_path(self, ctx, path, stroke, ctm, scissor):
        self._push(pymupdf.mupdf.ll_fz_bound_path(path, stroke, ctm))

    def clip_text(self, ctx, text, ctm, scissor):
        self._push(pymupdf.mupdf.ll_fz_bound_text(text, None, ctm))

    def clip_stroke_text(self, ctx, text, stroke, ctm, scissor):
        self._push(pymupdf.mupdf.ll_fz_bound_text(text, stroke, ctm))

    def clip_image_mask(self, ctx, image, ctm, scissor):
        self._push(pymupdf.mupdf.ll_fz_transform_rect(pymupdf.mupdf.fz_unit_rect, ctm))

    def begin_mask(self, ctx, area, luminosity, colorspace, bc, color_params):
        self._push(area)  # a soft mask: popped by pop_clip after the masked content

    def pop_clip(self, ctx):
        if len(self.stack) > 1:
            self.stack.pop()

    def fill_image(self, ctx, image, ctm, alpha, color_params):
        self.images.append(((ctm.a, ctm.b, ctm.c, ctm.d, ctm.e, ctm.f), self.stack[-1]))

    def fill_image_mask(self, ctx, image, ctm, colorspace, color, alpha, color_params):
        self.images.append(((ctm.a, ctm.b, ctm.c, ctm.d, ctm.e, ctm.f), self.stack[-1]))


def visible_image_boxes(page: pymupdf.Page, infos: list[dict]) -> list[pymupdf.Rect]:
    """The part of each placed image (``page.get_image_info()`` entries) that its clip path lets
    show, in unrotated page space like the entries' ``bbox``: a photo placed larger than its
    frame (cropped in a layout program, a map detail) shows only its clipped part. An image the
    trace does not match keeps its whole box."""
    boxes = [pymupdf.Rect(i["bbox"]) for i in infos]
    if not infos:
        return boxes
    rotation = page.rotation
    try:
        if rotation:
            page.set_rotation(0)  # as get_bboxlog and get_image_info answer: unrotated space
        dev = _ImageClips()
        pymupdf.mupdf.fz_run_page(page.this, dev, pymupdf.mupdf.FzMatrix(), pymupdf.mupdf.FzCookie())
        pymupdf.mupdf.fz_close_device(dev)
    except Exception:
        return boxes
    finally:
        if rotation:
            page.set_rotation(rotation)
    used = [False] * len(dev.images)
    for n, info in enumerate(infos):
        t = tuple(info.get("transform") or ())
        for m, (ctm, clip) in enumerate(dev.images):
            if not used[m] and len(t) == 6 and all(abs(a - b) < 1e-3 for a, b in zip(ctm, t)):
                used[m] = True
                if clip is not None:
                    boxes[n] = boxes[n] & clip
                break
    return boxes


def _ink_items(page: pymupdf.Page, log: list | None = None) -> list[tuple[BBox, str, int, float]]:
    """(box in displayed coordinates, "path" | "image", image xref, image native zoom).
    ``log``: the page's ``get_bboxlog()`` when the caller has it already."""
    page_area = abs(page.rect)
    items: list[tuple[BBox, str, int, float]] = []
    for kind, rect in (page.get_bboxlog() if log is None else log):
        if kind in ("fill-path", "stroke-path"):
            r = display_rect(page, rect) & page.rect
            if not r.is_empty and abs(r) < BACKGROUND * page_area:
                items.append((tuple(r), "path", 0, 0.0))
    infos = page.get_image_info(xrefs=True)
    for info, shown in zip(infos, visible_image_boxes(page, infos)):
        r = display_rect(page, shown) & page.rect
        if r.is_empty or abs(r) >= BACKGROUND * page_area:
            continue
        try:
            zoom = native_zoom(info)
        except (KeyError, TypeError, ValueError):
            zoom = 0.0
        items.append((tuple(r), "image", info.get("xref", 0), zoom))
    return items


def captioned_xrefs(placed: list[tuple[BBox, int]], lines: list[tuple[str, BBox]], others: list[BBox] = ()) -> set[int]:
    """Of the images ``placed`` on a page as ``(box, xref)`` that the document places on many
    pages (decoration by default: logos, banners, stamps), those this page captions as figures
    are: a figure shown again (a schematic repeated in each chapter). The page's other ink
    regions ``others`` compete for the captions (``assign_captions``), so a footer logo under a
    figure's caption does not take it. Every placement on the page of such an image stays in its
    figures; the others are dropped.

    >>> logo, pump = ((500, 20, 560, 60), 7), ((100, 200, 280, 335), 9)
    >>> captioned_xrefs([logo, pump], [("Fig. 2. The pump.", (100, 350, 300, 360))])
    {9}
    >>> footer_logo = ((280, 740, 330, 780), 7)
    >>> caption = [("Figure 3: The pump housing.", (140, 710, 400, 720))]
    >>> captioned_xrefs([footer_logo], caption), captioned_xrefs([footer_logo], caption, [(140, 440, 462, 700)])
    ({7}, set())
    """
    if not placed:
        return set()
    boxes = [b for b, _ in placed]
    figures = [(b, "raster") for b in boxes] + [(o, "vector") for o in others]
    captions = assign_captions(figures, caption_blocks(lines, boxes + list(others)))
    return {xref for (_, xref), caption in zip(placed, captions) if caption}


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


PART_GAP = 30.0  # points: figure parts this close, with no body text between, are one figure
BODY_LINE = 30  # characters: longer lines are body text (shorter ones are labels)


def _aligned(a: BBox, b: BBox) -> bool:
    """Side by side (sharing half the smaller height) or stacked (sharing half the smaller width)."""
    oy = min(a[3], b[3]) - max(a[1], b[1])
    ox = min(a[2], b[2]) - max(a[0], b[0])
    return oy >= 0.5 * min(a[3] - a[1], b[3] - b[1]) or ox >= 0.5 * min(a[2] - a[0], b[2] - b[0])


def merge_parts(cands: list[Candidate], lines: list[tuple[str, BBox]], gap: float = PART_GAP) -> list[Candidate]:
    """One figure, one region: parts drawn apart (panels side by side, a drawing and its
    dimension arrows, a row of small examples) join when they are within ``gap`` points and
    aligned, no body text line lies between them, and they do not each have a caption of their
    own. Tables never join. Captions are the page's text lines that start like one.

    >>> a, b = Candidate((100, 100, 250, 200), "vector"), Candidate((270, 100, 420, 200), "vector")
    >>> [c.bbox for c in merge_parts([a, b], [("Figure 1: Two panels.", (100, 210, 420, 220))])]
    [(100, 100, 420, 200)]
    >>> two = [("Figure 1: Left.", (100, 210, 240, 220)), ("Figure 2: Right.", (280, 210, 420, 220))]
    >>> len(merge_parts([a, b], two))  # each has its own caption: two figures
    2
    """
    caption_lines = caption_blocks(lines, [c.bbox for c in cands])
    body = [lb for t, lb in lines if len(t.strip()) > BODY_LINE and not is_caption(t)]
    cands = list(cands)
    while True:
        captions = assign_captions([(c.bbox, c.kind) for c in cands], caption_lines)
        best = None
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                a, b = cands[i], cands[j]
                if "table" in (a.kind, b.kind) or (captions[i] and captions[j]):
                    continue
                d = regions.gap(a.bbox, b.bbox)
                if d > gap or not _aligned(a.bbox, b.bbox):
                    continue
                u = regions.union(a.bbox, b.bbox)
                if any(regions.intersection(u, lb) >= 0.5 * (regions.area(lb) or 1)
                       and regions.intersection(a.bbox, lb) + regions.intersection(b.bbox, lb) < 0.5 * regions.area(lb)
                       for lb in body):
                    continue
                if best is None or d < best[0]:
                    best = (d, i, j)
        if best is None:
            return cands
        _, i, j = best
        a, b = cands[i], cands[j]
        kind = a.kind if a.kind == b.kind else "raster" if "raster" in (a.kind, b.kind) else "vector"
        cands[i] = Candidate(regions.union(a.bbox, b.bbox), kind, 0, " ".join(t for t in (a.labels, b.labels) if t),
                             zoom=max(a.zoom, b.zoom))
        del cands[j]


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
                 min_side: float, log: list | None = None) -> list[Candidate]:
    """Figure regions of a born-digital page, in reading order. Images whose xref is in
    ``skip_xrefs`` (placed on many pages) count only where the page captions them (``captioned_xrefs``).
    ``log``: the page's ``get_bboxlog()`` when the caller has it already."""
    items = _ink_items(page, log)
    size = (page.rect.width, page.rect.height)
    repeated = [(it[0], it[2]) for it in items if it[1] == "image" and it[2] in skip_xrefs]
    if repeated:
        shown: set[int] = set()
        if any(is_caption(t) for t, _ in lines):  # only a page with a caption can keep one (logo pages skip the grid)
            rest = [it[0] for it in items if not (it[1] == "image" and it[2] in skip_xrefs)]
            others = list(regions.ink_regions(regions.paint(size, rest), JOIN_GAP)) if rest else []
            shown = captioned_xrefs(repeated, lines, others)
        items = [it for it in items if not (it[1] == "image" and it[2] in skip_xrefs - shown)]
    if not items:
        return []
    grid = regions.paint(size, [it[0] for it in items])
    cands: list[Candidate] = []
    typed = [(it[0], it[1]) for it in items]
    drawings = None  # fetched only when a region might be a table
    for box in regions.ink_regions(grid, JOIN_GAP):
        grown = regions.grow_with_labels(box, [ln for ln in lines if not is_caption(ln[0])])
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
    cands = merge_parts(_merge_overlapping(cands), lines)
    cands.sort(key=lambda c: (round(c.bbox[1] / 10), c.bbox[0]))
    return cands


def ink_level(gray: np.ndarray) -> int:
    """The grey level below which a scanned page's pixel is ink: 200 on white paper, 40 levels
    under the paper's own shade on darker paper (the paper is the page's light end: its 90th
    percentile).

    >>> ink_level(np.full((10, 10), 255)), ink_level(np.full((10, 10), 185))
    (200, 145)
    """
    paper = int(np.percentile(gray, 90)) if gray.size else 255
    return min(200, paper - 40)


def find_scanned_figures(gray: np.ndarray, lines: list[tuple[str, BBox]], size: tuple[float, float],
                         min_side: float) -> list[Candidate]:
    """Figure regions on a scanned page: dark pixels that are not OCR'd text lines.

    ``gray`` is the page in grey at one pixel per grid cell (``regions.CELL`` points). Ink is
    darker than ``ink_level`` of the paper (grey recycled paper and photocopies too)."""
    ink = gray < ink_level(gray)
    for _, (x0, y0, x1, y1) in lines:
        r0, r1 = int(y0 / regions.CELL) - 1, int(y1 / regions.CELL) + 2
        c0, c1 = int(x0 / regions.CELL) - 1, int(x1 / regions.CELL) + 2
        ink[max(0, r0):r1, max(0, c0):c1] = False
    cands = []
    for box in regions.ink_regions(ink, JOIN_GAP):
        bw, bh = box[2] - box[0], box[3] - box[1]
        if bw < min_side or bh < min_side:
            continue
        grown = regions.grow_with_labels(box, [ln for ln in lines if not is_caption(ln[0])])
        if (grown[2] - grown[0]) * (grown[3] - grown[1]) >= BACKGROUND * size[0] * size[1]:
            continue
        inside = [t for t, lb in lines if regions.intersection(grown, lb) >= 0.5 * (regions.area(lb) or 1)]
        cands.append(Candidate(grown, "raster", 0, " ".join(inside)))
    cands = merge_parts(_merge_overlapping(cands), lines)
    cands.sort(key=lambda c: (round(c.bbox[1] / 10), c.bbox[0]))
    return cands


CAPTION_REACH = 48.0  # points between a figure and its caption, at most
SIDE_PENALTY = 12.0  # points added for the less usual side (tables: below; figures: above)
BESIDE_PENALTY = 24.0  # points added for a caption beside the figure rather than above/below


def is_caption(text: str) -> bool:
    """Does a line or block start like a caption (a label word and its number, see ``CAPTION``)?

    >>> [is_caption(t) for t in ("Table 2: Masses", "Figure S1: Supplement.", "Fig. 3a Detail", "Abb. 3: Pumpe",
    ...                          "Рис. 3. Насос", "图3 水泵", "그림 3. 펌프", "Figure A.1: Appendix")]
    [True, True, True, True, True, True, True, True]
    >>> [is_caption(t) for t in ("Figures show the pump.", "Table of contents", "表示する", "Figure 3rd",
    ...                          "Tablet2 firmware", "Figure x", "table 2 of the appendix", "Plot 1: measured")]
    [False, False, False, False, False, False, False, False]
    """
    return caption_label(text) is not None


def _caption_cost(box: BBox, kind: str, b: BBox, reach: float) -> float | None:
    """How far caption block ``b`` is from figure ``box``, with penalties for the less usual
    side; None when it is not placed like this figure's caption."""
    slack = 0.25 * (box[2] - box[0])  # centred captions can be wider than the figure
    overlaps_x = min(box[2] + slack, b[2]) - max(box[0] - slack, b[0]) > 0
    table = kind == "table"
    if overlaps_x:
        below = b[1] - box[3]
        if 0 <= below <= reach or (b[1] >= box[1] + 0.8 * (box[3] - box[1]) and below <= reach):
            return max(below, 0.0) + (SIDE_PENALTY if table else 0.0)
        above = box[1] - b[3]
        if 0 <= above <= reach:
            return above + (0.0 if table else SIDE_PENALTY)
    overlap_y = min(box[3], b[3]) - max(box[1], b[1])
    if overlap_y >= 0.5 * (b[3] - b[1]):  # beside: left or right, level with the figure
        side = max(b[0] - box[2], box[0] - b[2])
        if 0 <= side <= reach:
            return side + BESIDE_PENALTY
    return None


def assign_captions(figures: list[tuple[BBox, str]], blocks: list[tuple[str, BBox]],
                    reach: float = CAPTION_REACH) -> list[str]:
    """The caption of each figure ``(box, kind)``: a block starting like 'Figure 3:', 'Fig. 3.',
    'Table 2' below, above or beside it. Globally nearest first, so each caption goes to one
    figure at most and each figure gets one at most; tables prefer the caption above them,
    figures the one below (two stacked tables each get the caption over them).

    >>> tables = [((100, 110, 500, 182), "table"), ((100, 222, 500, 294), "table")]
    >>> caps = [("Table 1: First batch.", (100, 92, 300, 102)), ("Table 2: Second batch.", (100, 204, 300, 214))]
    >>> assign_captions(tables, caps)
    ['Table 1: First batch.', 'Table 2: Second batch.']
    >>> assign_captions([((100, 100, 300, 250), "vector"), ((320, 100, 500, 250), "vector")],
    ...                 [("Figure 1: Both panels.", (150, 260, 450, 270))])
    ['Figure 1: Both panels.', '']
    """
    pairs = []
    for ci, (text, b) in enumerate(blocks):
        if not is_caption(text):
            continue
        for fi, (box, kind) in enumerate(figures):
            cost = _caption_cost(box, kind, b, reach)
            if cost is not None:
                pairs.append((cost, fi, ci))
    out = [""] * len(figures)
    taken: set[int] = set()
    for _, fi, ci in sorted(pairs):
        if not out[fi] and ci not in taken:
            out[fi] = blocks[ci][0].strip()
            taken.add(ci)
    return out


def find_caption(box: BBox, blocks: list[tuple[str, BBox]], reach: float = CAPTION_REACH, kind: str = "vector") -> str:
    """The caption of one figure alone (see ``assign_captions`` for a page's figures)."""
    return assign_captions([(box, kind)], blocks, reach)[0]


def nearby_text(box: BBox, blocks: list[tuple[str, BBox]], caption: str, reach: float = 72.0, limit: int = 400) -> str:
    """Text of the blocks just above and below (or beside) a figure, nearest first."""
    near = []
    for text, b in blocks:
        same = caption and (text == caption or text.startswith(caption[:40]) or caption.startswith(text[:40]))
        if same or regions.intersection(box, b) >= 0.5 * (regions.area(b) or 1):
            continue
        d = regions.gap(box, b)
        if d <= reach:
            near.append((d, text))
    out = " ".join(t for _, t in sorted(near))
    return out[:limit]


def labels_inside(box: BBox, lines: list[tuple[str, BBox]]) -> str:
    return " ".join(t for t, lb in lines if regions.intersection(box, lb) >= 0.5 * (regions.area(lb) or 1))
