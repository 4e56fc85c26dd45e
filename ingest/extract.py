"""Stream a PDF page by page into records. Nothing here stores anything."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pymupdf

from . import figures as F
from . import regions, text
from .errors import BadDocument
from .files import check_pdf_file, file_sha256
from .ocr import ocr_lines, ocr_page, turn_box
from .records import Chunk, DocInfo, Figure, PageRecord

log = logging.getLogger(__name__)
pymupdf.TOOLS.mupdf_display_errors(False)
pymupdf.TOOLS.mupdf_display_warnings(False)

TEXT_FLAGS = pymupdf.TEXTFLAGS_TEXT | pymupdf.TEXT_DEHYPHENATE
OCR_DPI = 150
MIN_OCR_SIDE = 12  # pixels: an image thinner than this holds no readable line of text


def open_pdf(path: str | os.PathLike, refuse_xfa: bool = True) -> pymupdf.Document:
    """Open a PDF or raise BadDocument with the reason (and how to fix it where there is a way).
    ``refuse_xfa``: a dynamic XFA form (``dynamic_xfa``) is refused; page views of one stored
    before mmrag refused them pass False."""
    p = Path(path)
    check_pdf_file(p)
    try:
        doc = pymupdf.open(p, filetype="pdf")
    except Exception as exc:  # MuPDF raises several types for broken files
        raise BadDocument(f"{p.name}: corrupt PDF, cannot be opened ({exc})") from None
    if doc.needs_pass:
        doc.close()
        raise BadDocument(f"{p.name}: encrypted (password-protected); save an unencrypted copy and ingest that")
    if doc.page_count == 0:
        doc.close()
        raise BadDocument(f"{p.name}: the PDF has no pages")
    if refuse_xfa and dynamic_xfa(doc):
        doc.close()
        raise BadDocument(f"{p.name}: a dynamic XFA form: its pages hold only a 'Please wait...' notice and its content is "
                          "drawn by Adobe Reader alone; open it there, print it to PDF and ingest that copy")
    return doc


def dynamic_xfa(doc: pymupdf.Document) -> bool:
    """Is ``doc`` a dynamic XFA form (LiveCycle Designer's, as many government and bank forms
    are): an XFA form in its AcroForm whose catalog says ``/NeedsRendering true``, so that only
    Adobe Reader draws its content and the PDF's own pages show a placeholder. Static XFA forms
    (pages drawn as usual) are not."""
    try:
        cat = doc.pdf_catalog()
        return (doc.xref_get_key(cat, "NeedsRendering") == ("bool", "true")
                and doc.xref_get_key(cat, "AcroForm/XFA")[0] != "null")
    except Exception:  # a catalog MuPDF cannot read is for the page-level errors to report
        return False


def decoration_xrefs(doc: pymupdf.Document) -> set[int]:
    """Images placed on many pages (logos, banners, bullets) are decoration, not figures."""
    counts: Counter[int] = Counter()
    for pno in range(doc.page_count):
        try:
            counts.update({img[0] for img in doc.get_page_images(pno)})
        except Exception:
            continue
    need = max(3, int(0.1 * doc.page_count))
    return {xref for xref, c in counts.items() if c >= need}


def running_header_keys(doc: pymupdf.Document) -> set[str]:
    if doc.page_count < 3:
        return set()
    margin_texts = []
    for page in doc:
        h = page.rect.height
        texts = []
        for clip in (pymupdf.Rect(0, 0, page.rect.width, h * text.MARGIN),
                     pymupdf.Rect(0, h * (1 - text.MARGIN), page.rect.width, h)):
            try:  # get_text clips in unrotated page space
                texts += [b[4] for b in page.get_text("blocks", clip=clip * page.derotation_matrix, flags=TEXT_FLAGS)
                          if b[6] == 0]
            except Exception:
                pass
        margin_texts.append(texts)
    return text.running_lines(margin_texts, doc.page_count)


SCAN_SHARE = 0.5  # of the page: a scan's image (or its strips, joined) covers at least this much


def _scan_cover(page: pymupdf.Page, opaque: bool = False) -> float:
    """The share of the page covered by its largest picture made of images placed edge to edge:
    one image, or a scan stored as strips or tiles (scanners and JBIG2 encoders split pages so).
    Images apart from each other (a collage with gaps) do not join. ``opaque``: only images
    without a mask."""
    rects = [tuple(F.display_rect(page, i["bbox"]) & page.rect) for i in page.get_image_info()
             if not (opaque and i.get("has-mask"))]
    return regions.largest_patch((page.rect.width, page.rect.height), [r for r in rects if r[2] > r[0] and r[3] > r[1]])


STAMP_WORDS = 12  # visible words a scan may carry in its top/bottom margins and still be read by OCR


def margin_stamp(words: list, height: float) -> bool:
    """Are the page's text-layer ``words`` (x0, y0, x1, y1, word, ...; displayed coordinates) at
    most a stamp added to a scan: a Bates number, a page number, a filing stamp; a few words
    (``STAMP_WORDS``), all in the top or bottom margin (``text.MARGIN`` of the page height)?

    >>> margin_stamp([(450, 770, 540, 780, "ACME-000123")], 792), margin_stamp([(72, 300, 120, 310, "Pump")], 792)
    (True, False)
    """
    top, bottom = height * text.MARGIN, height * (1 - text.MARGIN)
    return len(words) <= STAMP_WORDS and all(w[3] <= top or w[1] >= bottom for w in words)


def _is_scanned(page: pymupdf.Page, words: list) -> bool:
    """No text layer, or only a stamp in the margins (``margin_stamp``), and a scan covering
    half the page or more (``_scan_cover``): the page is read by OCR, stamp included."""
    return (not words or margin_stamp(words, page.rect.height)) and _scan_cover(page) >= SCAN_SHARE


def _is_scan_with_text_layer(page: pymupdf.Page, bboxlog: list | None = None) -> bool:
    """A scanned page that carries a text layer (what ocrmypdf, Acrobat's 'searchable image' and
    scanners with OCR write): opaque images covering half the page or more (``_scan_cover``),
    and no text a reader sees: every text item is invisible (render mode 3) or hidden under
    images drawn after it. Its figures are in the scan's pixels, not in the page's drawing commands."""
    if _scan_cover(page, opaque=True) < SCAN_SHARE:
        return False
    log = [(kind, F.display_rect(page, r)) for kind, r in (page.get_bboxlog() if bboxlog is None else bboxlog)]
    images = [(n, r) for n, (kind, r) in enumerate(log) if kind.startswith("fill-image")]
    for n, (kind, r) in enumerate(log):
        if kind in ("fill-text", "stroke-text") and sum(abs(r & s) for m, s in images if m > n) < 0.5 * abs(r):
            return False  # text a reader sees: a born-digital page over a background picture
    return True


MAX_RENDER_PIXELS = 16_000_000  # any one render (page, figure, OCR image): far below Pillow's limit
MAX_RENDER_SIDE = 8000


def render_zoom(width: float, height: float, want: float, max_pixels: int = MAX_RENDER_PIXELS,
                max_side: int = MAX_RENDER_SIDE) -> float:
    """The zoom (pixels per point) to render a ``width`` x ``height`` point area at: ``want``,
    scaled down until the image fits the pixel budget and the side limit, and up until it is at
    least one pixel each way. Huge and tiny pages are rendered scaled, never refused.

    >>> render_zoom(612, 792, 2.0)
    2.0
    >>> int(render_zoom(14400, 14400, 2.0) * 14400)     # a 200-inch poster: 4000 px a side
    3996
    >>> render_zoom(0.5, 0.5, 1.0)                       # a page smaller than a pixel
    2.0
    """
    zoom = want
    if width * height * zoom * zoom > max_pixels:
        zoom = 0.999 * (max_pixels / (width * height)) ** 0.5  # MuPDF rounds sizes up
    zoom = max(zoom, 1.0 / max(min(width, height), 1e-6))  # at least one pixel each way
    return min(zoom, 0.999 * max_side / max(width, height, 1e-6))


def _pixmap(page: pymupdf.Page, clip, zoom: float, **kw) -> pymupdf.Pixmap:
    """Render ``clip`` (displayed-page coordinates; None: the whole page) at ``zoom`` within the
    pixel budget. Transparency is composited onto white: what a viewer shows on paper."""
    area = pymupdf.Rect(clip) if clip is not None else page.rect
    z = render_zoom(area.width, area.height, zoom)
    return page.get_pixmap(matrix=pymupdf.Matrix(z, z), clip=clip, alpha=False, **kw)


def _grey_cells(page: pymupdf.Page, oversample: int = 4) -> np.ndarray:
    """The page in grey, one pixel per grid cell, each the darkest of its ``oversample``² pixels
    (so hairlines survive the reduction). Huge pages are rendered coarser and spread to the grid."""
    gh, gw = int(page.rect.height / regions.CELL) + 1, int(page.rect.width / regions.CELL) + 1
    want = oversample / regions.CELL
    zoom = render_zoom(page.rect.width, page.rect.height, want)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csGRAY, alpha=False)
    arr = np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.stride)[:, : pix.width]
    k = int(zoom * regions.CELL)
    if k >= 1:
        h, w = arr.shape[0] // k, arr.shape[1] // k
        cells = arr[: h * k, : w * k].reshape(h, k, w, k).min(axis=(1, 3))
    else:  # fewer pixels than cells: each pixel covers several cells
        ys = np.minimum((np.arange(gh) * regions.CELL * zoom).astype(int), arr.shape[0] - 1)
        xs = np.minimum((np.arange(gw) * regions.CELL * zoom).astype(int), arr.shape[1] - 1)
        cells = arr[np.ix_(ys, xs)]
    return cells


def _png(page: pymupdf.Page, clip, dpi: float) -> bytes:
    return _pixmap(page, clip, dpi / 72.0).tobytes("png")


def _reason(exc: BaseException) -> str:
    """One line for a warning: the exception's message, or its type when it has none."""
    msg = " ".join(str(exc).split())
    return msg[:200] if msg else type(exc).__name__


def document_context(doc: pymupdf.Document) -> tuple[set[int], set[str]]:
    """What page extraction needs to know of the whole document: the xrefs of decoration images
    (placed on many pages) and the keys of running headers and footers."""
    return decoration_xrefs(doc), running_header_keys(doc)


def extract_pages(doc: pymupdf.Document, sha: str, cfg: dict, render: bool = True,
                  progress: Callable[[int], None] | None = None) -> Iterator[PageRecord]:
    """Yield one PageRecord per page, never holding more than one page in memory.

    ``cfg`` is the ``ingest`` section of the config. With ``render=False`` no image is rendered
    and no raster figure is OCR'd (used by ``mmrag inspect``; the page's own text is still read
    by OCR where the text layer cannot give it: scans, text drawn as outlines, fonts without a
    Unicode map, as it holds the captions). An item that cannot be extracted
    (a figure that does not render, an image OCR cannot read) is left out and named in the
    record's ``warnings``; a page that fails as a whole yields an empty record with a warning.
    (``mmrag ingest`` runs ``extract_page`` in worker processes instead: ``ingest.workers``.)"""
    skip, running = document_context(doc)
    xref_png: dict[tuple, bytes] = {}  # lone images already rendered
    for pno in range(doc.page_count):
        yield extract_page(doc, pno, sha, cfg, skip, running, xref_png, render)
        if progress:
            progress(pno + 1)


def extract_page(doc: pymupdf.Document, pno: int, sha: str, cfg: dict, skip: set[int], running: set[str],
                 xref_png: dict, render: bool = True) -> PageRecord:
    """The record of page ``pno`` (0-based); ``skip`` and ``running`` come from
    ``document_context``, ``xref_png`` is a cache of rendered lone images kept per document.
    A page that fails as a whole gives an empty record with a warning; BadDocument passes."""
    try:
        return _extract_page(doc, doc[pno], sha, cfg, skip, running, cfg["ocr"], render, xref_png)
    except BadDocument:
        raise
    except Exception as exc:  # one broken page must not lose the rest of the document
        why = f"page {pno + 1}: skipped ({_reason(exc)})"
        log.warning("%s", why)
        return PageRecord(sha, pno + 1, (0.0, 0.0), [], [], None, warnings=(why,))


def _extract_page(doc, page, sha, cfg, skip, running, ocr_mode, render, xref_png) -> PageRecord:
    size = (page.rect.width, page.rect.height)
    pno = page.number + 1
    warnings: list[str] = []

    def warn(what: str, exc: BaseException) -> None:
        line = f"page {pno}: {what} ({_reason(exc)})"
        log.warning("%s", line)
        warnings.append(line)

    tp = page.get_textpage(flags=TEXT_FLAGS)
    # every box from here on is in the coordinates of the page as displayed (/Rotate applied)
    words = [(*F.display_rect(page, w[:4]), *w[4:]) for w in page.get_text("words", textpage=tp)]
    words, symbols = _dingbat_words(page, tp, words)
    try:
        bboxlog = page.get_bboxlog()  # once: hidden text, scan layers, figures
    except Exception:
        bboxlog = None  # figure finding reads it again, and reports what fails
    try:
        hidden = _invisible_words(page, tp, words, bboxlog or [])
    except Exception as exc:  # the page's text is kept, hidden words included
        warn("the check for hidden text failed, all its text is kept", exc)
        hidden = set()
    changed = symbols | {words[n][5] for n in hidden}  # blocks with symbols read anew, or that lose words a reader cannot see...
    words = [w for n, w in enumerate(words) if n not in hidden]
    try:
        unreadable = _unreadable_words(page, tp, words)  # ...or words whose font maps no character to Unicode
    except Exception as exc:  # the page's text is kept as the text layer has it
        warn("the check for text without Unicode failed, all its text is kept", exc)
        unreadable = set()
    changed |= {words[n][5] for n in unreadable}
    garbled = [w for n, w in enumerate(words) if n in unreadable]
    words = [w for n, w in enumerate(words) if n not in unreadable]
    twice = text.overprinted(words)  # ...or sees once though drawn twice (fake bold, a shadow, two OCR layers)
    changed |= {words[n][5] for n in twice}
    words = [w for n, w in enumerate(words) if n not in twice]
    scanned = _is_scanned(page, words)
    read: list[tuple[str, tuple]] = []  # OCR lines that stand for garbled words
    if garbled and not (scanned and ocr_mode != "never"):
        if ocr_mode == "never":
            line = f"page {pno}: {len(garbled)} words left out: their font maps no character to Unicode (turn OCR on to read them)"
            log.warning("%s", line)
            warnings.append(line)
        else:
            try:
                read, missed = _ocr_unreadable(page, garbled)
            except Exception as exc:
                warn("OCR of text whose font has no Unicode map failed, that text is missing", exc)
                read, missed = [], 0
            if missed:
                line = f"page {pno}: {missed} words whose font maps no character to Unicode: OCR found no text there, left out"
                log.warning("%s", line)
                warnings.append(line)
            # the text-layer words on those OCR lines (a readable font in the same line) are read with them
            covered = {n for n, w in enumerate(words)
                       if any(b[0] <= (w[0] + w[2]) / 2 <= b[2] and b[1] <= (w[1] + w[3]) / 2 <= b[3] for _, b in read)}
            changed |= {words[n][5] for n in covered}
            words = [w for n, w in enumerate(words) if n not in covered]
    blocks, vertical = _text_blocks(page, tp, words, changed)
    min_side = float(cfg["min_figure_side"])
    source = "text"
    drawn = False  # the page's text is drawn as outlines or strokes, and read by OCR
    turns = 0  # quarter turns counter-clockwise that make an OCR'd page upright (scanned sideways)
    cands: list[F.Candidate] = []
    lines: list[tuple[str, tuple]] = []
    if scanned and ocr_mode != "never":
        try:
            lines, turns = _ocr_page(page)
        except Exception as exc:
            warn("OCR of the scanned page failed, its text is missing", exc)
        try:
            cands = F.find_scanned_figures(_grey_cells(page), lines, size, min_side)
        except Exception as exc:
            warn("figure detection failed, no figures from this page", exc)
        blocks, vertical = lines, set()
        source = "ocr"
    else:
        lines = F.page_lines(words)
        if read:
            if sum(len(t) for t, _ in read) > sum(len(t) for t, _ in blocks):
                source = "ocr"
            blocks, lines = blocks + read, lines + read
        if not words and not garbled and not scanned and ocr_mode != "never" and _drawn_ink(page, bboxlog):
            try:  # no text layer, but drawn ink: text drawn as outlines or strokes reads only as shown
                read, turns = _ocr_page(page)
            except Exception as exc:
                warn("OCR of the page (no text layer) failed, its text is missing", exc)
                read = []
            if read:
                blocks, lines, source, drawn = read, read, "ocr", True
                bboxlog = _without_glyphs(page, bboxlog, read)
        try:
            if scanned:
                cands = []
            elif _is_scan_with_text_layer(page, bboxlog):  # figures from the scan's pixels, minus its text lines
                cands = F.find_scanned_figures(_grey_cells(page), lines, size, min_side)
            else:
                cands = F.find_figures(page, lines, skip, min_side, bboxlog)
        except Exception as exc:
            warn("figure detection failed, no figures from this page", exc)
    if turns:  # headers, footers and page numbers are where the upright page has them
        upright = size if turns % 2 == 0 else size[::-1]
        blocks = [(t, turn_box(b, -turns, upright)) for t, b in
                  text.drop_running([(t, turn_box(b, turns, size)) for t, b in blocks], upright[1], running)]
    else:
        blocks = text.drop_running(blocks, size[1], running)
    figs = []
    captions = F.assign_captions([(c.bbox, c.kind) for c in cands], F.caption_blocks(lines, [c.bbox for c in cands]))
    for n, (cand, caption) in enumerate(zip(cands, captions), 1):
        try:
            near = F.nearby_text(cand.bbox, blocks, caption)
            labels = cand.labels or (F.labels_inside(cand.bbox, lines) if source == "text" or drawn else "")
            png = b""
            if render:
                png = _figure_png(page, cand, cfg, xref_png)
                if cand.kind == "raster" and not labels and cfg["ocr_figures"] and ocr_mode != "never":
                    try:
                        labels = _figure_ocr(png, xref_png)
                    except Exception as exc:  # the figure is kept, without the words OCR would have read
                        warn(f"figure {n}: OCR could not read it, stored without its inner text", exc)
        except Exception as exc:
            warn(f"figure {n} skipped", exc)
            continue
        figs.append(Figure(sha, pno, tuple(round(v, 1) for v in cand.bbox), cand.kind, png,
                           caption, near, labels, n))
    # text that belongs to a figure (labels, ticks) is kept with the figure, not in the passages
    body = [b for b in blocks if not any(regions.intersection(f.bbox, b[1]) >= 0.8 * (regions.area(b[1]) or 1)
                                         for f in figs if f.kind != "table")]
    if turns:  # read in the upright page's order; boxes stay on the page as it is shown
        upright = size if turns % 2 == 0 else size[::-1]
        ordered = text.reading_order([(t, turn_box(b, turns, size)) for t, b in body], upright[0])
        pieces = [(t, turn_box(b, -turns, upright)) for t, b in
                  text.chunk_blocks(ordered, int(cfg["chunk_size"]), int(cfg["chunk_overlap"]))]
    else:
        ordered = text.reading_order(body, size[0], vertical)
        pieces = text.chunk_blocks(ordered, int(cfg["chunk_size"]), int(cfg["chunk_overlap"]))
    chunks = [Chunk(sha, pno, i, t, tuple(round(v, 1) for v in b), source)
              for i, (t, b) in enumerate(pieces)]
    png = None
    if render:
        try:
            png = _png(page, None, int(cfg["page_dpi"]))
        except Exception as exc:
            warn("page image skipped", exc)
    return PageRecord(sha, pno, size, chunks, figs, png, scanned, tuple(warnings))


def _ocr_page(page: pymupdf.Page) -> tuple[list[tuple[str, tuple]], int]:
    """The text lines OCR reads on the page rendered at ``OCR_DPI`` (text, displayed box in
    points), and the quarter turns counter-clockwise that make the page upright (a scan fed in
    sideways or upside down; ``ocr.ocr_page``)."""
    pix = _pixmap(page, None, OCR_DPI / 72.0)
    return ocr_page(pix.tobytes("png"), scale=page.rect.width / pix.width)


MIN_DRAWN_PATHS = 8  # paths, none a background, a page without a text layer draws before OCR looks for text in them


def _drawn_ink(page: pymupdf.Page, bboxlog: list | None) -> bool:
    """Does the page draw enough paths (from its ``get_bboxlog()``) to hold text: on a page
    without a text layer, text may be drawn as glyph outlines (posters, slides and drawings
    exported with fonts turned to curves) or strokes (CAD text). Paths covering ``F.BACKGROUND``
    of the page or more (a page-size white fill, as office exports draw) do not count, and a few
    (a rule, a frame: fewer than ``MIN_DRAWN_PATHS``) are not worth a page OCR.

    >>> import pymupdf
    >>> page = pymupdf.open().new_page()
    >>> _ = page.draw_rect(page.rect, color=None, fill=(1, 1, 1)), page.draw_line((72, 72), (500, 72))
    >>> _drawn_ink(page, page.get_bboxlog())
    False
    >>> _ = [page.draw_rect((x, 100, x + 8, 110), color=None, fill=(0, 0, 0)) for x in range(72, 300, 20)]
    >>> _drawn_ink(page, page.get_bboxlog())
    True
    """
    page_area = abs(page.rect)
    small = (1 for kind, r in bboxlog or () if kind.endswith("-path")
             and abs(F.display_rect(page, r) & page.rect) < F.BACKGROUND * page_area)
    return sum(1 for _, _ in zip(range(MIN_DRAWN_PATHS), small)) >= MIN_DRAWN_PATHS


GLYPH_PAD = 2.0  # points around an OCR line that a glyph's path may reach


def _without_glyphs(page: pymupdf.Page, bboxlog: list, lines: list[tuple[str, tuple]]) -> list:
    """The page's bbox log without the paths that draw the OCR'd text ``lines``: paths whose
    centre lies on a line (padded by ``GLYPH_PAD``) and no taller than one and a half lines. So
    text drawn as outlines is no figure, and a figure's outlined caption is not part of its box
    (its labels come back as lines beside it, as on any page)."""
    boxes = [pymupdf.Rect(b) + (-GLYPH_PAD, -GLYPH_PAD, GLYPH_PAD, GLYPH_PAD) for _, b in lines]

    def glyph(r: pymupdf.Rect) -> bool:
        centre = pymupdf.Point((r.x0 + r.x1) / 2, (r.y0 + r.y1) / 2)
        return any(centre in b and r.height <= 1.5 * (b.height - 2 * GLYPH_PAD) for b in boxes)

    return [(kind, rect) for kind, rect in bboxlog
            if not (kind.endswith("-path") and glyph(F.display_rect(page, rect)))]


MIN_INK_CONTRAST = 24  # grey levels between the lightest and darkest pixel: less is a blank or flat image
WHITE_TEXT = 0.9  # text this light in every channel (of 1) is checked against what the page shows under it


MAX_COVER_FILLS = 3000  # fills drawn after text that are checked for covering it (more: a plot page)
MAX_COVER_PAIRS = 20_000_000  # fill x text-item comparisons a page may cost: fewer fills on text-dense pages


def covered_text(log: list) -> list[tuple]:
    """Where fills drawn after text lie over it, from a page's bbox log (``get_bboxlog()``:
    kind, box): the overlap of each path or image with each text item drawn before it (an image
    drawn over invisible text, ``ignore-text``, is the scan of an OCR layer put under it: no
    cover). Text there may be hidden (a redaction box, a white-out, a picture) or show through
    (a highlight): the page's pixels decide. Only the first ``MAX_COVER_FILLS`` fills after text count (fewer
    on a text-dense page: ``MAX_COVER_PAIRS`` comparisons at most).

    >>> covered_text([("fill-text", (72, 60, 300, 75)), ("fill-path", (120, 58, 210, 77)), ("fill-text", (72, 90, 200, 105))])
    [(120.0, 60.0, 210.0, 75.0)]
    >>> covered_text([("ignore-text", (72, 60, 300, 75)), ("fill-image", (0, 0, 612, 792)), ("fill-path", (120, 58, 210, 77))])
    [(120.0, 60.0, 210.0, 75.0)]
    """
    texts = [(n, r, kind == "ignore-text") for n, (kind, r) in enumerate(log) if kind in ("fill-text", "stroke-text", "ignore-text")]
    if not texts:
        return []
    fills = [(n, kind, r) for n, (kind, r) in enumerate(log) if n > texts[0][0] and kind in ("fill-path", "fill-image")]
    t = np.array([r for _, r, _ in texts], float).reshape(-1, 4)
    order = np.array([n for n, _, _ in texts])
    ocr_layer = np.array([i for _, _, i in texts])  # invisible text: an image over it is its scan, not a cover
    out: list[tuple] = []
    for n, kind, (x0, y0, x1, y1) in fills[:min(MAX_COVER_FILLS, MAX_COVER_PAIRS // len(texts))]:
        box = np.stack([np.maximum(t[:, 0], x0), np.maximum(t[:, 1], y0), np.minimum(t[:, 2], x1), np.minimum(t[:, 3], y1)], 1)
        hit = (order < n) & (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
        if kind == "fill-image":
            hit &= ~ocr_layer
        out += [tuple(map(float, b)) for b in box[hit]]
        if len(out) > MAX_COVER_FILLS:
            break
    return out


def _invisible_words(page: pymupdf.Page, tp: pymupdf.TextPage, words: list, bboxlog: list = ()) -> set[int]:
    """The indices of ``words`` (displayed coordinates) a reader cannot see: set in white or
    near-white (``WHITE_TEXT``), fully transparent or invisible (render mode 3: MuPDF gives it
    alpha 0), or covered by a fill drawn after it (``covered_text`` of the page's ``bboxlog``),
    where the rendered page shows no colour contrast (``MIN_INK_CONTRAST`` levels in some RGB
    channel) in the word's box: white text on white paper (hidden keyword lists, template
    leftovers), text under a black redaction box or a white-out. White text on a dark banner, a
    yellow or light-green one, or a photo is seen, and kept (judged in colour: in grey, white on
    yellow is 255 against 227, and anti-aliasing at 72 dpi leaves too little); so is text under a
    see-through highlight. Invisible or transparent text over an image is an OCR layer over its
    scan: kept without a look at the pixels, since a faint scan's ink may show little contrast.
    Pages without such text cost one look at the text's colours, no render."""
    images = [r for kind, r in bboxlog if kind == "fill-image"]

    def over_image(b) -> bool:
        return any(r[0] < b[2] and b[0] < r[2] and r[1] < b[3] and b[1] < r[3] for r in images)

    suspect = [F.display_rect(page, s["bbox"]) for b in page.get_text("dict", textpage=tp)["blocks"]
               if b.get("type") == 0 for ln in b["lines"] for s in ln["spans"]
               if (s.get("alpha", 255) == 0 and not over_image(s["bbox"]))
               or min((s["color"] >> k) & 255 for k in (16, 8, 0)) >= 255 * WHITE_TEXT]
    suspect += [F.display_rect(page, r) for r in covered_text(bboxlog)]
    if not suspect:
        return set()
    zoom = render_zoom(page.rect.width, page.rect.height, 1.0)
    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    rgb = np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.stride)[:, : pix.width * 3].reshape(pix.height, pix.width, 3)
    marked = np.zeros(rgb.shape[:2], bool)  # the suspect areas, in the render's pixels
    for r in suspect:
        marked[max(0, int(r.y0 * zoom)): int(r.y1 * zoom) + 1, max(0, int(r.x0 * zoom)): int(r.x1 * zoom) + 1] = True
    out = set()
    for n, w in enumerate(words):
        cx, cy = int((w[0] + w[2]) / 2 * zoom), int((w[1] + w[3]) / 2 * zoom)
        if not (0 <= cy < marked.shape[0] and 0 <= cx < marked.shape[1] and marked[cy, cx]):
            continue
        box = rgb[max(0, int(w[1] * zoom)): int(w[3] * zoom) + 1, max(0, int(w[0] * zoom)): int(w[2] * zoom) + 1]
        box = box.reshape(-1, 3).astype(np.int16)
        if not box.size or int((box.max(0) - box.min(0)).max()) < MIN_INK_CONTRAST:
            out.add(n)
    return out


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
UNMAPPED_FLAGS = TEXT_FLAGS & ~pymupdf.TEXT_CID_FOR_UNKNOWN_UNICODE  # unmapped characters read U+FFFD


MIN_UNMAPPED_RUN = 3  # characters without Unicode in one word, at least half of it: a run of text, not a lone symbol


def _unreadable_words(page: pymupdf.Page, tp: pymupdf.TextPage, words: list) -> set[int]:
    """The indices of ``words`` (displayed coordinates) whose text is not what the page shows:
    drawn in a font that maps none of its characters to Unicode (no ToUnicode map and no known
    encoding: Identity-H fonts written without a map, symbolic TrueType subsets), so MuPDF can
    only stand in their character codes, which for such fonts are glyph numbers ("7KH\x03SUHVVXUH"
    for "The pressure").

    A word is unreadable when it lies in a run of unmapped characters (a word read without the
    stand-in that is at least half U+FFFD, ``MIN_UNMAPPED_RUN`` or more of them) and its codes are
    glyph numbers: the page has a Type0 font with an Identity encoding and no ToUnicode map (then
    every such run on the page counts: MuPDF's words do not say their font, and a page rarely
    mixes that font with a simple font whose unmapped codes are letters), or
    the word's block holds a control character (the glyph number of a space or a full stop;
    words split on controls, so the block shows it, not the word). A lone unmapped symbol (a
    large bracket of a TeX formula, code 18) is no run and keeps its code; so do runs in simple
    fonts without controls: Type3 and other simple fonts without a map mostly use their letters'
    codes (TeX's PK fonts), which read right. Other pages cost one look at their blocks and fonts.

    >>> import pymupdf
    >>> page = pymupdf.open().new_page()
    >>> _ = page.insert_text((72, 72), "Plain text.")
    >>> tp = page.get_textpage()
    >>> _unreadable_words(page, tp, page.get_text("words", textpage=tp))
    set()
    """
    blocks = {b[5] for b in page.get_text("blocks", textpage=tp) if b[6] == 0 and _CONTROL.search(b[4])}
    glyph_numbers = any(f[0] > 0 and f[2] == "Type0" and f[5].startswith("Identity")  # xref 0: a direct font dict
                        and page.parent.xref_get_key(f[0], "ToUnicode")[0] == "null" for f in page.get_fonts())
    if not blocks and not glyph_numbers:
        return set()
    runs = [F.display_rect(page, w[:4]) + (-1, -1, 1, 1) for w in page.get_text("words", flags=UNMAPPED_FLAGS)
            if MIN_UNMAPPED_RUN <= w[4].count("\ufffd") >= len(w[4]) / 2]
    return {n for n, w in enumerate(words) if (glyph_numbers or w[5] in blocks)
            and any(pymupdf.Rect(w[:4]) in r for r in runs)}


UNREADABLE_PAD = 3.0  # points around a line of unreadable words that its OCR line may reach


def _ocr_unreadable(page: pymupdf.Page, garbled: list) -> tuple[list[tuple[str, tuple]], int]:
    """Text lines (text, displayed box) read by OCR from the page's pixels where its ``garbled``
    words (``_unreadable_words``) are drawn, and how many of those words no OCR line covers.
    The whole page is read, at ``OCR_DPI`` as a scan is (the text detector misses words and
    spaces in a tight crop); a line is kept when it lies on a line of those words (the same
    height, padded by ``UNREADABLE_PAD``, and overlapping it across): a whole line, readable
    words beside the garbled ones included, which the caller then takes out of the text layer.
    Pieces of one line that OCR returns apart are joined (``text.join_line_pieces``)."""
    boxes = [pymupdf.Rect(b) + (-UNREADABLE_PAD, -UNREADABLE_PAD, UNREADABLE_PAD, UNREADABLE_PAD)
             for _, b in F.page_lines(garbled)]

    def on(b, r: pymupdf.Rect) -> bool:
        return r.y0 <= (b[1] + b[3]) / 2 <= r.y1 and b[0] < r.x1 and r.x0 < b[2]

    pix = _pixmap(page, None, OCR_DPI / 72.0)
    read = text.join_line_pieces([(t, b) for t, b in ocr_lines(pix.tobytes("png"), scale=page.rect.width / pix.width)
                                  if any(on(b, r) for r in boxes)])
    missed = sum(1 for w in garbled if not any(b[0] <= (w[0] + w[2]) / 2 <= b[2] and b[1] <= (w[1] + w[3]) / 2 <= b[3]
                                               for _, b in read))
    return read, missed


def _text_blocks(page: pymupdf.Page, tp: pymupdf.TextPage, words: list, changed: set[int] = frozenset()
                 ) -> tuple[list[tuple[str, tuple]], set[tuple]]:
    """The page's text blocks (clean text, displayed box) of the visible ``words``, and the boxes
    of those that are vertical text (for ``text.reading_order``). A block whose
    lines alternate between the two columns of the page (drawn row by row across them) becomes
    one block per column (``text.split_columns``), so each column is read on its own. Blocks
    numbered in ``changed`` lost invisible words: they are their remaining words, line by line.
    Lines of vertical text (``_vertical_lines``) are taken out of their blocks and read as
    ``text.vertical_blocks`` orders them: top to bottom, the columns right to left."""
    vertical = _vertical_lines(page, tp, words)
    by_block: dict[int, list] = {}
    by_line: dict[tuple, list] = {}
    for w in words:
        if (w[5], w[6]) in vertical:
            by_line.setdefault((w[5], w[6]), []).append(w)
        else:
            by_block.setdefault(w[5], []).append(w)
    changed = changed | {b for b, _ in by_line}  # those blocks keep their horizontal lines only
    blocks = []
    if by_line:
        lines = [(*box, t) for t, box in map(text.words_block, by_line.values())]
        blocks += [(text.clean_block_text(t), box) for t, box in text.vertical_blocks(lines)]
    upright = {box for _, box in blocks}
    for b in page.get_text("blocks", textpage=tp):
        if b[6] != 0:
            continue
        parts = text.split_columns(by_block.get(b[5], []), page.rect.width)
        if parts is None and b[5] in changed:
            parts = [text.words_block(by_block[b[5]])] if b[5] in by_block else []
        elif parts is None:
            parts = [(b[4], tuple(F.display_rect(page, b[:4])))]
        blocks += [(text.clean_block_text(t), box) for t, box in parts]
    return [b for b in blocks if b[0]], upright


def _dingbat_words(page: pymupdf.Page, tp: pymupdf.TextPage, words: list) -> tuple[list, set[int]]:
    """``words`` with those drawn in a ZapfDingbats font (a form's ticked check box, list ticks)
    read as the symbols shown (``text.dingbats_text``: "4" becomes "✔"), and the numbers of the
    blocks that changed. The page's text dict is read only when the page has form fields or
    names such a font."""
    if not words or (page.first_widget is None
                     and not any("dingbat" in f[3].lower() for f in page.get_fonts())):
        return words, set()
    spans = [F.display_rect(page, s["bbox"]) + (-1, -1, 1, 1)
             for b in page.get_text("dict", textpage=tp)["blocks"] if b.get("type") == 0
             for ln in b["lines"] for s in ln["spans"] if "dingbat" in s["font"].lower()]
    if not spans:
        return words, set()
    read = [(*w[:4], text.dingbats_text(w[4]), *w[5:]) if any(pymupdf.Rect(w[:4]) in r for r in spans) else w
            for w in words]
    return read, {w[5] for w, r in zip(words, read) if w[4] != r[4]}


_CJK_CHAR = re.compile(f"[{text._CJK}]")


def _vertical_lines(page: pymupdf.Page, tp: pymupdf.TextPage, words: list) -> set[tuple[int, int]]:
    """(block, line) numbers of the lines MuPDF reports as written vertically (``wmode`` 1: a
    font with a vertical encoding such as Identity-V, how Chinese and Japanese are set top to
    bottom), on an unrotated page that holds Chinese or Japanese words; empty otherwise, without
    reading the page's text a second time. Text merely rotated 90 degrees (``wmode`` 0) is not
    vertical writing and is left to the horizontal reading."""
    if page.rotation or not any(_CJK_CHAR.search(w[4]) for w in words):
        return set()
    return {(b["number"], n) for b in page.get_text("dict", textpage=tp)["blocks"] if b.get("type") == 0
            for n, ln in enumerate(b["lines"]) if ln.get("wmode") == 1}


def _figure_ocr(png: bytes, cache: dict) -> str:
    """The words OCR reads in a raster figure's PNG, skipping the OCR that buys nothing: an image
    under ``MIN_OCR_SIDE`` pixels on a side (no line of text fits), one without ink contrast
    (blank or one flat colour: no text to read), and an image this document already had read
    (``cache``, per document: the same rendering placed again)."""
    if min(_png_size(png)) < MIN_OCR_SIDE:
        return ""
    key = ("ocr", hashlib.sha1(png).digest())
    if key not in cache:
        cache[key] = " ".join(t for t, _ in ocr_lines(png)) if _has_ink(png) else ""
    return cache[key]


def _has_ink(png: bytes) -> bool:
    """Whether the image has any contrast that could be text: ``MIN_INK_CONTRAST`` grey levels
    or more between its lightest and darkest pixel."""
    pix = pymupdf.Pixmap(png)
    if pix.n - pix.alpha != 1:
        pix = pymupdf.Pixmap(pymupdf.csGRAY, pix)
    grey = np.frombuffer(pix.samples, np.uint8)[:: pix.n]
    return bool(grey.size) and int(grey.max()) - int(grey.min()) >= MIN_INK_CONTRAST


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) of a PNG from its header: ``_png_size(b"") == (0, 0)``."""
    if len(png) < 24 or png[12:16] != b"IHDR":
        return (0, 0)
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _figure_png(page, cand, cfg, rendered) -> bytes:
    """The figure as the page shows it: its region rendered, so soft masks, stencil masks,
    /Decode arrays, CMYK/indexed/16-bit colour, rotation and flips come out as a viewer draws
    them, on white. Regions with images are rendered near the images' own resolution (at least
    half the figure dpi, at most twice it); a lone image placed again with the same size and
    orientation reuses its first rendering (one stored file)."""
    dpi = float(cfg["figure_dpi"])
    if cand.xref and cand.clip:
        clip = pymupdf.Rect(cand.clip) & page.rect
        key = (cand.xref, round(clip.width, 1), round(clip.height, 1), round(cand.zoom, 3))
        if key in rendered:
            return rendered[key]
    else:
        clip, key = (pymupdf.Rect(cand.bbox) + (-2, -2, 2, 2)) & page.rect, None
    zoom = dpi / 72.0
    if cand.zoom:
        zoom = min(max(cand.zoom, zoom / 2), zoom * 2)
    png = _pixmap(page, clip, zoom).tobytes("png")
    if key:
        rendered[key] = png
    return png


def inspect_pdf(path: str | os.PathLike, cfg: dict, name: str | None = None) -> dict:
    """What extraction finds, without storing or rendering anything: ``{"doc", "sha256", "pages",
    "chunks", "figures": [{"page", "bbox", "kind", "caption"}], "warnings": [str]}``. ``name`` is
    the document name to report (default: the file's base name)."""
    doc = open_pdf(path)
    try:
        sha = file_sha256(path)
        out = {"doc": name or Path(path).name, "sha256": sha, "pages": doc.page_count, "figures": [], "chunks": 0,
               "warnings": []}
        for rec in extract_pages(doc, sha, cfg, render=False):
            out["chunks"] += len(rec.chunks)
            out["figures"] += [{"page": f.page, "bbox": list(f.bbox), "kind": f.kind, "caption": f.caption}
                               for f in rec.figures]
            out["warnings"] += list(rec.warnings)
        return out
    finally:
        doc.close()


MAX_EMBEDDED = 200  # embedded PDFs a file may bring in (a portfolio of a project's documents)


def embedded_pdfs(doc: pymupdf.Document) -> tuple[str, ...]:
    """The names of the files embedded in ``doc`` whose file name ends in ``.pdf``: a PDF
    portfolio's documents (its pages are only a cover sheet), or PDFs attached to a PDF; at
    most ``MAX_EMBEDDED``. Nothing is decompressed here (an attached multi-GB log must not
    count against the file's limits); ``save_embedded_pdfs`` checks each is a PDF. Each name
    is the key ``save_embedded_pdfs`` takes."""
    names = []
    try:
        for name in doc.embfile_names():
            info = doc.embfile_info(name)
            given = str(info.get("ufilename") or info.get("filename") or name)
            if given.lower().endswith(".pdf"):
                names.append(name)
            if len(names) >= MAX_EMBEDDED:
                break
    except Exception:  # an unreadable names tree: no attachments to offer
        return tuple(names)
    return tuple(names)


def embedded_names(given: list[str]) -> list[str]:
    """Document names for embedded files from their given file names (which may hold folders):
    the base name, with its folders where two would share one, and a number where they still
    would; empty, "." and ".." become ``attachment-N.pdf``.

    >>> embedded_names(["2023/report.pdf", "2024/report.pdf", "a.pdf", "..", "x/a.pdf", "r.pdf", "r.pdf"])
    ['2023/report.pdf', '2024/report.pdf', 'a.pdf', 'attachment-4.pdf', 'x/a.pdf', 'r.pdf', 'r (2).pdf']
    """
    parts = [[p for p in g.replace("\\", "/").split("/") if p not in ("", ".", "..")] or [f"attachment-{n + 1}.pdf"]
             for n, g in enumerate(given)]
    base = [ps[-1] for ps in parts]
    names = ["/".join(ps) if base.count(ps[-1]) > 1 else ps[-1] for ps in parts]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{Path(n).stem} ({seen[n]}){Path(n).suffix}")
    return out


def save_embedded_pdfs(path: str | os.PathLike, names: tuple[str, ...], folder: str | os.PathLike,
                       max_bytes: float) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Write the embedded PDFs ``names`` of the PDF at ``path`` into ``folder`` (one sub-folder
    each, the file under its own name, so errors name it): (file, its document name from
    ``embedded_names``) for each, and (document name, why) for each left out: over
    ``max_bytes`` (its declared size, else its bytes), unreadable, or not a PDF after all."""
    out, left = [], []
    doc = open_pdf(path)
    try:
        infos = []
        for name in names:
            try:
                infos.append(doc.embfile_info(name))
            except Exception:
                infos.append({})
        owns = embedded_names([str(i.get("ufilename") or i.get("filename") or name) for i, name in zip(infos, names)])
        for n, (name, info, own) in enumerate(zip(names, infos, owns)):
            try:
                if float(info.get("size") or -1) > max_bytes:
                    left.append((own, f"larger than ingest.max_file_mb ({max_bytes / 1e6:g} MB)"))
                    continue
                data = doc.embfile_get(name)
            except Exception as exc:
                left.append((own, f"cannot be read from the file ({_reason(exc)})"))
                continue
            if len(data) > max_bytes:
                left.append((own, f"larger than ingest.max_file_mb ({max_bytes / 1e6:g} MB)"))
            elif b"%PDF-" not in data[:1024]:
                left.append((own, "named .pdf but not a PDF (no %PDF- header)"))
            else:
                target = Path(folder) / f"{n:04d}" / Path(own).name
                target.parent.mkdir()
                target.write_bytes(data)
                out.append((target, own))
            del data
    finally:
        doc.close()
    return out, left


def doc_info(path: str | os.PathLike, doc: pymupdf.Document, sha: str | None = None) -> DocInfo:
    return DocInfo(Path(path).name, sha or file_sha256(path), doc.page_count)


__all__ = ["open_pdf", "extract_pages", "inspect_pdf", "file_sha256", "doc_info", "embedded_pdfs", "save_embedded_pdfs"]
