"""PDF extraction: text chunks, figures (raster, vector, tables), captions, page images, OCR.

This package knows PyMuPDF and nothing of embeddings or stores: it turns a PDF into records.
"""

from .records import Chunk, Figure, PageRecord, DocInfo
from .extract import open_pdf, extract_pages, inspect_pdf

__all__ = ["Chunk", "Figure", "PageRecord", "DocInfo", "open_pdf", "extract_pages", "inspect_pdf"]
