"""The stored-item schema: what the index holds, as typed records, and the one place that turns
them into Chroma metadata and back (``to_chroma`` / ``*_from_chroma``), plus the ``Filter`` the
store turns into both its Chroma ``where`` and its Python check. Nothing outside ``index/`` sees
metadata keys or ``where`` dicts.

Metadata layout (unchanged since the first index, so existing indexes stay readable):

- visual (``mmrag_visual``): doc_sha, doc, page, kind, bbox (JSON list, "" for none), caption,
  figure, image, label, and for pages ``scanned``; the Chroma document is the item's text;
- text (``mmrag_text``): doc_sha, doc, page, kind (text | figure_text), unit, bbox, source; the
  Chroma document is the passage;
- documents (``mmrag_docs``, id = sha256): doc, status, pages, figures, chunks, started,
  ingested_at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

FIGURE_KINDS = ("raster", "vector", "table")
VISUAL_KINDS = FIGURE_KINDS + ("page",)
KINDS = VISUAL_KINDS + ("text",)  # what a search result can be

BBox = tuple[float, float, float, float]


def bbox_to_meta(bbox) -> str:
    """A box as stored: a JSON list rounded to 0.1 pt; no box is ``""``.

    >>> bbox_to_meta((1, 2.26, 3, 4)), bbox_to_meta(None)
    ('[1.0, 2.3, 3.0, 4.0]', '')
    """
    return json.dumps([round(float(v), 1) for v in bbox]) if bbox else ""


def bbox_from_meta(value: str | None) -> BBox | None:
    """The inverse of ``bbox_to_meta``.

    >>> bbox_from_meta('[1.0, 2.3, 3.0, 4.0]'), bbox_from_meta('')
    ((1.0, 2.3, 3.0, 4.0), None)
    """
    return tuple(json.loads(value)) if value else None


@dataclass(frozen=True)
class VisualItem:
    """A figure (raster, vector, table) or a page render, in the CLIP collection."""

    id: str  # f-… (figure) or p-… (page)
    doc_sha: str
    doc: str  # display name of its document
    page: int  # 1-based
    kind: str  # raster | vector | table | page
    image: str  # PNG path relative to data_dir
    bbox: BBox | None = None  # PDF points, top-left origin; None for pages
    caption: str = ""
    figure: int = 0  # figure number on its page (1-based), 0 for pages
    label: str = ""  # zero-shot label, "" for pages
    scanned: bool = False  # pages only: the page had no text layer
    text: str = ""  # figure text (caption, OCR, nearby) or page text

    @property
    def is_figure(self) -> bool:
        return self.kind in FIGURE_KINDS

    def to_chroma(self) -> tuple[str, dict, str]:
        """(id, metadata, document) as stored."""
        meta = {"doc_sha": self.doc_sha, "doc": self.doc, "page": self.page, "kind": self.kind,
                "bbox": bbox_to_meta(self.bbox), "caption": self.caption, "figure": self.figure,
                "image": self.image, "label": self.label}
        if self.kind == "page":
            meta["scanned"] = self.scanned
        return self.id, meta, self.text


def visual_from_chroma(id: str, meta: dict, document: str | None) -> VisualItem:
    return VisualItem(id, meta["doc_sha"], meta.get("doc", ""), int(meta["page"]), meta["kind"],
                      meta.get("image", ""), bbox_from_meta(meta.get("bbox")), meta.get("caption") or "",
                      int(meta.get("figure") or 0), meta.get("label") or "", bool(meta.get("scanned", False)),
                      document or "")


def stands_for(kind: str, source: str | None) -> str:
    """What a passage stands for, from its stored ``kind`` and ``source`` (raw metadata values):
    ``text`` for a chunk, its figure's kind for a figure passage (no source: ``text``). The one
    place this rule lives: ``TextItem.stands_for`` and the exact scan's rows (which read 100k
    items' metadata without building records) both use it; ``Filter.where`` states it for Chroma.

    >>> stands_for("text", "ocr"), stands_for("figure_text", "raster"), stands_for("figure_text", "")
    ('text', 'raster', 'text')
    """
    return "text" if kind == "text" else (source or "text")


@dataclass(frozen=True)
class TextItem:
    """A passage in the text collection: a chunk of a page's text, or a figure passage (caption
    with nearby text, or caption with the words inside the figure) that stands for its figure."""

    id: str  # c-… (chunk), tf-…/lf-… (figure passages)
    doc_sha: str
    doc: str
    page: int
    kind: str  # text | figure_text
    unit: str  # what a hit on it stands for: the chunk's own id, or its figure's id
    text: str
    bbox: BBox | None = None
    source: str = "text"  # chunks: text | ocr; figure passages: the figure's kind

    @property
    def stands_for(self) -> str:
        """The kind of result it stands for: ``text`` for a chunk, the figure's kind otherwise."""
        return stands_for(self.kind, self.source)

    def to_chroma(self) -> tuple[str, dict, str]:
        meta = {"doc_sha": self.doc_sha, "doc": self.doc, "page": self.page, "kind": self.kind,
                "unit": self.unit, "bbox": bbox_to_meta(self.bbox), "source": self.source}
        return self.id, meta, self.text


def text_from_chroma(id: str, meta: dict, document: str | None) -> TextItem:
    return TextItem(id, meta["doc_sha"], meta.get("doc", ""), int(meta["page"]), meta["kind"],
                    meta.get("unit") or id, document or "", bbox_from_meta(meta.get("bbox")),
                    meta.get("source") or "text")


@dataclass(frozen=True)
class DocRecord:
    """A document in the registry. Searches see only ``complete`` ones."""

    sha256: str
    doc: str  # display name
    status: str  # pending | complete | removing (being deleted: hidden, finished by the next writer)
    pages: int = 0
    figures: int = 0
    chunks: int = 0
    started: float | None = None  # unix time
    ingested_at: float | None = None


DOC_FIELDS = tuple(f.name for f in fields(DocRecord) if f.name != "sha256")


def doc_to_meta(values: dict[str, Any]) -> dict:
    """Registry metadata from DocRecord fields (unknown names refused, None values left out)."""
    bad = set(values) - set(DOC_FIELDS)
    if bad:
        raise TypeError(f"not a document field: {sorted(bad)}")
    return {k: v for k, v in values.items() if v is not None}


def doc_from_chroma(sha: str, meta: dict) -> DocRecord:
    return DocRecord(sha, **{k: meta[k] for k in DOC_FIELDS if k in meta})


@dataclass(frozen=True)
class Filter:
    """Which items a query or listing may return; ``None`` means any. ``documents`` are sha256s,
    ``kinds`` what an item is or stands for (``KINDS``: a figure passage stands for its figure's
    kind), ``labels`` zero-shot labels (visual items only: a passage's figure label is known only
    from its figure), ``page`` one page number.

    The store applies a filter both as Chroma's ``where`` and as ``accepts`` on results; both
    are written here, side by side, and ``tests/test_store.py`` checks they agree.

    >>> f = Filter(documents=frozenset({"s1"}), kinds=frozenset({"vector", "text"}))
    >>> f.accepts(VisualItem("f-1", "s1", "a.pdf", 2, "vector", "images/x.png"))
    True
    >>> f.accepts(TextItem("tf-1", "s1", "a.pdf", 2, "figure_text", "f-9", "caption", source="raster"))
    False
    >>> f.where("visual")
    {'$and': [{'doc_sha': {'$in': ['s1']}}, {'kind': {'$in': ['text', 'vector']}}]}
    """

    documents: frozenset[str] | None = None
    kinds: frozenset[str] | None = None
    labels: frozenset[str] | None = None
    page: int | None = None

    @classmethod
    def of(cls, documents=None, kinds=None, labels=None, page: int | None = None) -> Filter:
        """A filter from any iterables (None stays None)."""
        as_set = lambda v: None if v is None else frozenset(v)  # noqa: E731
        return cls(as_set(documents), as_set(kinds), as_set(labels), page)

    def nothing(self, which: str) -> bool:
        """True when no item of the collection (``visual`` / ``text``) can pass."""
        if self.documents is not None and not self.documents:
            return True
        if self.kinds is not None:
            possible = VISUAL_KINDS if which == "visual" else ("text",) + FIGURE_KINDS
            if not self.kinds & set(possible):
                return True
        return which == "visual" and self.labels is not None and not self.labels

    def accepts(self, item: VisualItem | TextItem) -> bool:
        if self.documents is not None and item.doc_sha not in self.documents:
            return False
        if self.page is not None and item.page != self.page:
            return False
        if isinstance(item, VisualItem):
            if self.kinds is not None and item.kind not in self.kinds:
                return False
            return self.labels is None or item.label in self.labels
        return self.kinds is None or item.stands_for in self.kinds

    def where(self, which: str) -> dict | None:
        """Chroma's ``where`` for the ``visual`` or ``text`` collection (None: no condition)."""
        conds: list[dict] = []
        if self.documents is not None:
            conds.append({"doc_sha": {"$in": sorted(self.documents)}})
        if self.page is not None:
            conds.append({"page": self.page})
        if self.kinds is not None:
            if which == "visual":
                conds.append({"kind": {"$in": sorted(self.kinds)}})
            else:
                figure = sorted(self.kinds & set(FIGURE_KINDS))
                either = ([{"kind": "text"}] if "text" in self.kinds else []) + \
                    ([{"$and": [{"kind": "figure_text"}, {"source": {"$in": figure}}]}] if figure else [])
                conds.append(either[0] if len(either) == 1 else {"$or": either} if either else {"kind": "none"})
        if which == "visual" and self.labels is not None:
            conds.append({"label": {"$in": sorted(self.labels)}})
        if not conds:
            return None
        return conds[0] if len(conds) == 1 else {"$and": conds}
