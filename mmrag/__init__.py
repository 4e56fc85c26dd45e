"""mmrag: ask questions about the diagrams, charts and figures in your PDFs."""

__version__ = "0.1.0"
