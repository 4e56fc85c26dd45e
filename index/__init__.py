"""Embedding models and the Chroma store. Knows nothing of PDFs."""
