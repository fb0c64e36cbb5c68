"""An exclusive lock on an output folder: one process at a time writes a run or an explanation.

The lock is ``flock`` on ``FOLDER/.shapkern.lock``. The operating system releases it when its
holder exits in any way, a kill included, so a stale lock never blocks: the file stays behind and
the next process takes it over. The holder writes its pid, host, start time and command line into
the file (left there after it ends); a second process is refused with a message that quotes them.

- Within one process the lock is re-entrant, counted per folder: ``shapkern train`` holds it around
  the whole command and its Trainer takes it again.
- Under torchrun only rank 0 takes it: rank 0 writes for every rank. A second run's rank 0 is
  refused and exits, and torchrun then stops that run's other ranks.
- Processes forked while it is held (data loader workers) share it until they exit.
- flock needs a local file system or one that supports it (NFS v4 does).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile
import threading
import time

__all__ = ["LOCK_FILE", "FolderInUseError", "FolderLock"]

LOCK_FILE = ".shapkern.lock"

_held: dict[str, list] = {}  # real path of a folder -> [open lock file, depth]; this process's locks
_held_guard = threading.Lock()


class FolderInUseError(OSError):
    """Another process holds the folder's lock."""


def _not_writable(folder: str, exc: OSError) -> OSError:
    return type(exc)(exc.errno, f"cannot write in the output folder {folder}: {exc.strerror}; choose another")


class FolderLock:
    """``with FolderLock(folder): ...`` or ``lock = FolderLock(folder).acquire()`` ... ``lock.release()``.

    Acquiring creates the folder, checks that files can be created in it (OSError naming it
    otherwise) and raises FolderInUseError, naming the holder, when another process holds it.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self._key: str | None = None

    def acquire(self) -> FolderLock:
        if self._key is not None:
            return self
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise _not_writable(self.folder, exc) from None
        key = os.path.realpath(self.folder)
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
            else:
                _held[key] = [self._lock(), 1]
        self._key = key
        return self

    def _lock(self):
        path = os.path.join(self.folder, LOCK_FILE)
        try:
            file = open(path, "a+")  # noqa: SIM115 (held open for as long as the lock is)
        except OSError as exc:
            raise _not_writable(self.folder, exc) from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "a process that has not written its name yet"
            file.close()
            raise FolderInUseError(
                f"{self.folder} is in use by another shapkern process ({holder}); wait until it ends, or "
                "write to another folder (a process that was killed has released it)"
            ) from None
        try:
            file.seek(0)
            file.truncate()
            argv = getattr(sys, "orig_argv", sys.argv)  # python -m shapkern train ... (3.10+)
            command = " ".join([os.path.basename(argv[0]), *argv[1:]])
            file.write(
                f"pid {os.getpid()} on host {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n"
            )
            file.flush()
            fd, probe = tempfile.mkstemp(dir=self.folder, prefix=".write-probe-")  # the folder itself
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            file.close()
            raise _not_writable(self.folder, exc) from None
        return file

    def release(self) -> None:
        """Release this hold; the lock itself goes when the last hold of this process does."""
        if self._key is None:
            return
        with _held_guard:
            entry = _held[self._key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                entry[0].close()
        self._key = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
