"""Retrieval, prompting and answering. Knows nothing of PDF parsing or of the UI."""

from .records import Answer, Citation, Hit
from .retrieve import Retriever, rrf

__all__ = ["Answer", "Citation", "Hit", "Retriever", "rrf"]
