"""Errors of the app layer, and the tuple of every error meant for the user.

Each layer raises its own errors (``ingest.errors``, ``index.errors``); this module re-exports
them so callers of the app have one place to look, and ``USER_ERRORS`` is what the CLI turns into
one line and exit code 2."""

from index.errors import BadSetting, ModelMismatch, StoreError, WeightsUnavailable
from ingest.errors import BadDocument, IngestError


class MMRagError(Exception):
    """Base error of the app layer: str(err) is a one-line message a user can act on."""


class ConfigError(MMRagError):
    """The configuration file or a value in it is wrong."""


class NotFound(MMRagError):
    """A document or item the user named is not in the library."""


USER_ERRORS: tuple[type[Exception], ...] = (MMRagError, IngestError, StoreError)

__all__ = ["MMRagError", "ConfigError", "NotFound", "BadDocument", "IngestError", "StoreError", "BadSetting",
           "ModelMismatch", "WeightsUnavailable", "USER_ERRORS"]
