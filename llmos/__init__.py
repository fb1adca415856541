"""llmos: an operating system for language-model work.

Programs talk to the kernel only through the syscall ABI::

    from llmos import connect
    c = connect()
    print(c.uname())
"""
from llmos.syscalls.client import Client, connect
from llmos.syscalls.errors import SyscallError

__version__ = "0.1.0"
__all__ = ["Client", "SyscallError", "connect", "__version__"]
