"""OCR with rapidocr-onnxruntime (its ONNX models ship in the wheel, so it works offline)."""

from __future__ import annotations

import threading

from .records import BBox
from .text import normalise_text

_engine = None
_lock = threading.Lock()
_threads = -1  # onnxruntime's intra-op threads; -1: its default (one per core)


def set_threads(n: int) -> None:
    """Threads the OCR engine may use (set before its first use; extraction workers share the
    cores between them)."""
    global _threads
    _threads = int(n)


def _get_engine():
    global _engine
    with _lock:
        if _engine is None:
            import logging

            from rapidocr_onnxruntime import RapidOCR

            _engine = RapidOCR(**({"intra_op_num_threads": _threads} if _threads > 0 else {}))
            logging.getLogger("RapidOCR").setLevel(logging.WARNING)
            for h in list(logging.getLogger("RapidOCR").handlers):
                h.setLevel(logging.WARNING)
        return _engine


def ocr_lines(image: bytes, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0),
              min_score: float = 0.5) -> list[tuple[str, BBox]]:
    """Text lines found in an encoded image, each with its box mapped to page points:
    ``point = offset + pixel * scale``. Lines are in top-to-bottom order."""
    engine = _get_engine()
    with _lock:  # the ONNX sessions are shared; one call at a time keeps memory flat
        result, _ = engine(image)
    return _lines(result, min_score, scale, offset)


def _lines(result, min_score: float, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0),
           turned: tuple[int, tuple[float, float]] = (0, (0.0, 0.0))) -> list[tuple[str, BBox]]:
    """rapidocr's ``result`` as (clean text, box in points) lines, top to bottom. ``turned``:
    (quarter turns, size in pixels) of the image the result was read from, which is the page's
    image turned that many times counter-clockwise: boxes are turned back onto the page."""
    turns, size = turned
    lines = []
    for quad, text, score in result or []:
        if float(score) < min_score or not text.strip():
            continue
        xs = [p[0] for p in quad]
        ys = [p[1] for p in quad]
        x0, y0, x1, y1 = turn_box((min(xs), min(ys), max(xs), max(ys)), -turns, size)
        ox, oy = offset
        lines.append((normalise_text(text).strip(), (ox + x0 * scale, oy + y0 * scale, ox + x1 * scale, oy + y1 * scale)))
    lines.sort(key=lambda t: (round(t[1][1] / 4), t[1][0]))
    return lines


def turn_box(box: BBox, turns: int, size: tuple[float, float]) -> BBox:
    """``box`` (x0, y0, x1, y1) on a page of ``size`` (width, height), on that page turned
    ``turns`` quarter turns counter-clockwise (negative: clockwise). Units are the page's.

    >>> turn_box((10, 20, 30, 60), 1, (100, 200))      # the page's left edge becomes its bottom
    (20, 70, 60, 90)
    >>> turn_box(turn_box((10, 20, 30, 60), 1, (100, 200)), -1, (200, 100))
    (10, 20, 30, 60)
    >>> turn_box((10, 20, 30, 60), 2, (100, 200))
    (70, 140, 90, 180)
    """
    x0, y0, x1, y1 = box
    w, h = size
    for _ in range(turns % 4):
        x0, y0, x1, y1 = y0, w - x1, y1, w - x0
        w, h = h, w
    return (x0, y0, x1, y1)


SIDEWAYS = 1.5  # a line box this many times taller than wide is text running up or down the page
TURNED_READS = 0.8  # of the unturned reading's confident characters: a sideways page turned reads at least this much
FLIPPED = 0.9  # the angle classifier's confidence that a line is upside down, for its vote to count


def _weight(result, min_score: float) -> float:
    """How much a reading found: characters read, each weighted by its line's confidence."""
    return sum(float(score) * len(text.strip()) for _, text, score in result or [] if float(score) >= min_score)


def _read_lines(result, min_score: float) -> list[tuple[object, int]]:
    """The (quad as a float32 array, characters) of the lines of ``result`` that count for the
    page's orientation: read with confidence, two characters or more."""
    import numpy as np

    return [(np.array(quad, dtype=np.float32), len(text.strip())) for quad, text, score in result or []
            if float(score) >= min_score and len(text.strip()) >= 2]


def _upright_turns(engine, img, result, min_score: float) -> tuple[int, object]:
    """The quarter turns (counter-clockwise) that make the page in ``img`` upright, and the
    reading of the page so turned. A page whose lines mostly run up or down the page (by
    characters read, ``SIDEWAYS``) is read again turned a quarter, and kept so when that reads
    about as much (``TURNED_READS``; rapidocr reads sideways lines one by one, but not in
    order). Then, when the angle classifier finds most lines upside down (``FLIPPED``; it
    tells 0 from 180 degrees only), the page is read turned half round more. An upright page
    costs one run of the small classifier over its lines."""
    import numpy as np

    kept = _read_lines(result, min_score)
    total = sum(n for _, n in kept)
    if not total:
        return 0, result
    turns = 0
    if sum(n for quad, n in kept if np.ptp(quad[:, 1]) > SIDEWAYS * np.ptp(quad[:, 0])) > total / 2:
        turned = engine(np.ascontiguousarray(np.rot90(img, 1)))[0]
        if _weight(turned, min_score) < TURNED_READS * _weight(result, min_score):
            return 0, result
        turns, result = 1, turned
        kept = _read_lines(result, min_score)
        total = sum(n for _, n in kept)
    if kept:
        crops = engine.get_crop_img_list(np.ascontiguousarray(np.rot90(img, turns)), [q for q, _ in kept])
        _, votes, _ = engine.text_cls(crops)
        if sum(n for (label, conf), (_, n) in zip(votes, kept) if "180" in label and conf >= FLIPPED) > total / 2:
            turns += 2
            result = engine(np.ascontiguousarray(np.rot90(img, turns)))[0]
    return turns, result


def ocr_page(image: bytes, scale: float = 1.0, min_score: float = 0.5) -> tuple[list[tuple[str, BBox]], int]:
    """``ocr_lines`` for a whole page, which may have been scanned sideways or upside down: the
    lines (boxes in page points on the page as it is, ``point = pixel * scale``) and the
    quarter turns counter-clockwise that make the page upright (``_upright_turns``; 0, 1, 2 or
    3), for reading its lines in order."""
    engine = _get_engine()
    with _lock:
        img = engine.load_img(image)
        result, _ = engine(img)
        try:
            turns, result = _upright_turns(engine, img, result, min_score)
        except Exception:  # the classifier failing on an odd crop: the page as read stands
            turns = 0
    size = (img.shape[1], img.shape[0]) if turns % 2 == 0 else (img.shape[0], img.shape[1])
    return _lines(result, min_score, scale, turned=(turns, size)), turns
