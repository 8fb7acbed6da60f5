"""One run at a time in an output folder: the run holds an exclusive lock on ``<folder>/.run.lock`` for its
whole life, so a second run into the same folder is refused at once instead of replacing the first one's
checkpoints and config while both exit 0.

The lock is the kernel's (``flock``): it is released when the holder exits in any way, kill -9 included, so a
lock left by a dead run is never in force; the file names the holder's pid and host for the refusal message
and is removed by the holder at exit."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".run.lock"


class RunFolderInUse(ValueError):
    """Another live run holds the output folder."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def _acquire(path: str) -> int:
    """An fd holding the lock on ``path`` (the file that is at ``path`` now, not one a departing holder
    unlinked between our open and our flock)."""
    assert fcntl is not None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            folder = os.path.dirname(path) or "."
            raise RunFolderInUse(
                f"{folder} is in use by another run ({_holder(path)}); wait for it to end or choose another --out-dir"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        os.close(fd)  # the holder removed the file as we took it: lock the one there now


@contextlib.contextmanager
def hold_run_folder(folder: str) -> Iterator[None]:
    """Hold ``folder`` for the duration of the block (the folder must exist); raises :class:`RunFolderInUse`
    naming the holder when another process holds it."""
    if fcntl is None:
        yield
        return
    path = os.path.join(folder, LOCK_NAME)
    fd = _acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before unlocking: a run waiting on this file then locks a fresh one
        os.close(fd)
