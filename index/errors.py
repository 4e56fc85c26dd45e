"""Errors of the index layer (store, embedders). str(err) is a one-line message a user can act on."""


class StoreError(Exception):
    """Base of every error ``index`` raises on purpose."""


class BadSetting(StoreError):
    """A store or embedder setting names something that does not exist (model, config file, mode)."""


class ModelMismatch(StoreError):
    """An index was filled by another embedding model than the one configured."""


class WeightsUnavailable(StoreError):
    """Model weights could not be found or loaded."""


class StorageFault(StoreError):
    """The disk under the data dir failed us: full, read-only, or an index file damaged or emptied.
    ``kind``: full | read-only | damaged | emptied."""

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind


_FULL = ("database or disk is full", "no space left on device", "disk full", "errno 28", "os error 28")
_READ_ONLY = ("readonly database", "read-only file system", "os error 30", "errno 30")
_CORRUPT = ("file is not a database", "database disk image is malformed", "malformed database schema")


def explain_storage_error(exc: BaseException, data_dir) -> StorageFault | None:
    """A one-line StorageFault saying what is wrong with the storage and what to do, or None
    when ``exc`` is not a storage fault. Recognises a full disk, a read-only data dir and a
    damaged index database, from OSError numbers or the messages SQLite and Chroma give.

    >>> msg = str(explain_storage_error(OSError(28, "No space left on device"), "/data"))
    >>> msg.startswith("the disk holding /data is full ([Errno 28] No space left on device): free some space")
    True
    >>> explain_storage_error(ValueError("bad query"), "/data") is None
    True
    """
    import errno

    text = str(exc).lower()
    code = getattr(exc, "errno", None)
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    if code == errno.ENOSPC or any(s in text for s in _FULL):
        return StorageFault(f"the disk holding {data_dir} is full ({first}): free some space and run the command "
                            "again; nothing half-written was kept", "full")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or any(s in text for s in _READ_ONLY):
        return StorageFault(f"{data_dir} is read-only ({first}): commands that change the library need write "
                            "access (remount it read-write or fix its permissions); list, search and ask still work",
                            "read-only")
    if any(s in text for s in _CORRUPT):
        return StorageFault(f"the index database in {data_dir}/chroma is damaged ({first}): restore {data_dir}/chroma "
                            "from a backup, or move it away and ingest the PDFs again", "damaged")
    return None
