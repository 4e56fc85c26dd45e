"""Typed records produced by extraction. Ids are content-derived so re-ingesting is idempotent."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

BBox = tuple[float, float, float, float]


def short_hash(*parts: object) -> str:
    """Stable 16-hex id from parts: ``short_hash("a", 1) == short_hash("a", 1)``."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class DocInfo:
    name: str  # file name as given by the user (display only, never a path)
    sha256: str
    pages: int


@dataclass(frozen=True)
class Chunk:
    doc_sha: str
    page: int  # 1-based
    index: int  # order within the document
    text: str
    bbox: BBox | None = None  # union of the blocks it came from, PDF points, top-left origin
    source: str = "text"  # "text" (text layer) or "ocr"

    @property
    def id(self) -> str:
        return "c-" + short_hash(self.doc_sha, self.page, self.index, self.text)


@dataclass(frozen=True)
class Figure:
    doc_sha: str
    page: int
    bbox: BBox
    kind: str  # "raster" | "vector" | "table"
    png: bytes = field(repr=False)  # rendered region (or the image itself for rasters)
    caption: str = ""
    nearby_text: str = ""
    ocr_text: str = ""
    number: int = 0  # order on the page, 1-based

    @property
    def image_sha(self) -> str:
        return hashlib.sha256(self.png).hexdigest()

    @property
    def id(self) -> str:
        return "f-" + short_hash(self.doc_sha, self.page, *(round(v, 1) for v in self.bbox))

    @property
    def text(self) -> str:
        """Everything textual about the figure, for keyword and passage search."""
        return "\n".join(t for t in (self.caption, self.ocr_text, self.nearby_text) if t)


@dataclass(frozen=True)
class PageRecord:
    """One page's extraction result; pages are streamed one at a time."""

    doc_sha: str
    page: int
    size: tuple[float, float]
    chunks: list[Chunk]
    figures: list[Figure]
    png: bytes | None = field(default=None, repr=False)  # whole-page render
    scanned: bool = False
    # items of this page that could not be extracted, one line each naming page and reason
    # ("page 3: figure 2 skipped: cannot render (...)"); the other items are still here
    warnings: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return "p-" + short_hash(self.doc_sha, self.page)
