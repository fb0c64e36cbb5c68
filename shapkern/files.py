"""File writes that never leave a half-written file, and failed writes that say why.

- :func:`atomic_write` writes through a temporary file in the same folder, fsyncs it, renames it
  over the target and fsyncs the folder: a kill at any moment leaves the old file or the new one.
- :func:`reported_write` turns a failed write (a full disk, a read-only folder; torch.save's zip
  writer reports a full disk as a RuntimeError) into an OSError naming the file and the cause.
- :func:`clean_temporary_files` removes what a killed write left behind.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["atomic_write", "clean_temporary_files", "fsync_dir", "reported_write", "write_synced"]

_TMP_MARK = ".tmp-"


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{_TMP_MARK}{os.getpid()}")


def _free_space(folder: str) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"


def _write_failure(path: str, exc: BaseException) -> OSError | None:
    """The error for a failed write of ``path``, naming it and the cause; None when ``exc`` is not a
    failed write. torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected
    pos", "file write failed"), without the errno."""
    folder = os.path.dirname(os.path.abspath(path))
    if isinstance(exc, OSError):
        code, cause = exc.errno, exc.strerror or str(exc)
        if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            cause = f"no space left on device ({cause}; {_free_space(folder)} free in {folder})"
    elif isinstance(exc, RuntimeError) and (
        "unexpected pos" in str(exc) or "PytorchStreamWriter" in str(exc)
    ):
        code = errno.ENOSPC
        cause = (
            f"no space left on device, or the write failed otherwise ({_free_space(folder)} free in "
            f"{folder}; PyTorch: {str(exc).splitlines()[0]})"
        )
    else:
        return None
    return OSError(code or errno.EIO, f"cannot write {path}: {cause}")


@contextmanager
def reported_write(path: str, *, replaces: bool = False) -> Iterator[None]:
    """Turn a failed write of ``path`` in the block (a full disk, a read-only folder) into an
    OSError that names the file and the cause; ``replaces``: the block writes a temporary file that
    would replace ``path``, so the message says the files there are unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        failure = _write_failure(path, exc)
        if failure is None:
            raise
        if replaces:
            failure = OSError(failure.errno, f"{failure.strerror}; the files already there are unchanged")
        raise failure from exc


def write_synced(path: str, write: Callable[[str], None]) -> str:
    """Write to a temporary file next to ``path`` and fsync it; returns the temporary path. On any
    failure the temporary file is removed (a full disk names itself, see reported_write)."""
    tmp = _temporary_path(path)
    try:
        with reported_write(path, replaces=True):
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` and a rename: a kill leaves the old file or the new."""
    tmp = write_synced(path, write)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def clean_temporary_files(folder: str) -> list[str]:
    """Remove temporary files that a killed save left in ``folder``; returns their paths."""
    stale = glob.glob(os.path.join(glob.escape(folder), f".*{_TMP_MARK}*"))
    for path in stale:
        os.remove(path)
    return stale
