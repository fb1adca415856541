"""llmos.services.fs: the file store's storage engine (a library; the service wraps it).

``FileStore`` keeps per-user namespaces of content-addressed, durably written files. See
``store.py`` for the API and the durability argument.
"""
from llmos.services.fs.errors import FsError
from llmos.services.fs.store import FileStore
from llmos.services.fs.writer import Writer

__all__ = ["FileStore", "FsError", "Writer"]
