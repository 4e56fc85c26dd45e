"""Library errors carry a message meant for the user; only the CLI turns them into exit codes."""


class MMRagError(Exception):
    """Base error: str(err) is a one-line message a user can act on."""


class ConfigError(MMRagError):
    pass


class BadDocument(MMRagError):
    """A file that cannot be ingested (corrupt, encrypted, empty, not a PDF)."""


class ModelMismatch(MMRagError):
    """An index was filled by another embedding model than the one configured."""


class WeightsUnavailable(MMRagError):
    """CLIP weights could not be loaded."""


class NotFound(MMRagError):
    pass
