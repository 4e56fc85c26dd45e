"""Errors of the index layer (store, embedders). str(err) is a one-line message a user can act on."""


class StoreError(Exception):
    """Base of every error ``index`` raises on purpose."""


class BadSetting(StoreError):
    """A store or embedder setting names something that does not exist (model, config file, mode)."""


class ModelMismatch(StoreError):
    """An index was filled by another embedding model than the one configured."""


class WeightsUnavailable(StoreError):
    """Model weights could not be found or loaded."""
