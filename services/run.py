"""``python -m llmos.services.run NAME``: run one service (how the kernel starts them).

NAME is a built-in service or a plug-in: any installed package can add one by declaring an
entry point in the ``llmos.services`` group whose object is a ``Service`` subclass::

    [project.entry-points."llmos.services"]
    echo = "llmos_echo:EchoService"
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys

from llmos import hostmem

# name -> "module:Class" of the services shipped with llmos (the kernel lists the same names
# in kernel/syssvc.py BUILTIN_SERVICES; a test keeps the two equal)
BUILTIN: dict[str, str] = {"fs": "llmos.services.fs.service:FsService",
                           "kg": "llmos.services.kg.service:KgService",
                           "tuner": "llmos.services.tuner.service:TunerService"}


def find(name: str):
    if name in BUILTIN:
        module, _, attr = BUILTIN[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    for ep in importlib.metadata.entry_points(group="llmos.services"):
        if ep.name == name:
            return ep.load()
    raise SystemExit(f"llmos: no service named {name!r}")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        raise SystemExit("usage: python -m llmos.services.run NAME")
    hostmem.keep_large_buffers()
    find(argv[0])().run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
