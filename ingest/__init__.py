"""PDF extraction: text chunks, figures (raster, vector, tables), captions, page images, OCR.

This package knows PyMuPDF and nothing of embeddings or stores: it turns a PDF into records.
Its names are imported on first use, so ``from ingest.errors import BadDocument`` does not pay
for importing PyMuPDF (over a second).
"""

from importlib import import_module

_WHERE = {"Chunk": "records", "Figure": "records", "PageRecord": "records", "DocInfo": "records",
          "open_pdf": "extract", "extract_pages": "extract", "inspect_pdf": "extract"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'ingest' has no attribute {name!r}")
