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
    lines = []
    for quad, text, score in result or []:
        if float(score) < min_score or not text.strip():
            continue
        xs = [p[0] for p in quad]
        ys = [p[1] for p in quad]
        ox, oy = offset
        lines.append((normalise_text(text).strip(), (ox + min(xs) * scale, oy + min(ys) * scale,
                                     ox + max(xs) * scale, oy + max(ys) * scale)))
    lines.sort(key=lambda t: (round(t[1][1] / 4), t[1][0]))
    return lines
