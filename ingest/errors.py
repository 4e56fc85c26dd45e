"""Errors of the extraction layer. str(err) is a one-line message a user can act on."""


class IngestError(Exception):
    """Base of every error ``ingest`` raises on purpose."""


class BadDocument(IngestError):
    """A file that cannot be ingested (corrupt, encrypted, empty, not a PDF, too large, too slow)."""
