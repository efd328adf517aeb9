"""Writing files safely: never a half-written file under its final name, the umask respected,
and a full disk reported as such.

Every file epsdist writes through a temporary name goes through ``atomic_path`` (or
``atomic_write_bytes``): the temporary file is created beside the target (same file system,
so the rename is atomic), gets the mode an ordinary ``open(path, "w")`` would give it
(``0o666 & ~umask``; ``tempfile.mkstemp`` alone makes it 0600, unreadable to the rest of a
group), is flushed to disk and renamed into place. On any error it is removed and the old file,
if any, stays.

``disk_full`` recognises "no space left on device" however it surfaces: ``OSError`` with
``errno.ENOSPC`` from Python, or the C++ stream error of ``torch.save`` ("basic_ios::clear:
iostream error", "file write failed") on a file system that is (nearly) full.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile

_CXX_WRITE_ERRORS = ("iostream error", "file write failed", "No space left",
                     "unexpected pos")
LOW_SPACE_BYTES = 64 * 2 ** 20     # "full" for a C++ write error that carries no errno


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``,
    since 4.7); elsewhere set-and-restore (racy only against threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 minus the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str, fsync: bool = True):
    """``with atomic_path(p) as tmp: write(tmp)``: the caller writes the temporary file ``tmp``
    (by any means: ``torch.save``, PIL, tarfile); on success it gets the umask's mode and is
    renamed to ``path``; on any error it is removed and ``path`` is untouched. A full disk is
    raised as ``DiskFullError`` naming ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if (isinstance(e, Exception) and not isinstance(e, DiskFullError)
                and disk_full(e, directory)):
            raise DiskFullError(path) from e
        raise


def atomic_write_bytes(path: str, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it (see ``atomic_path``)."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


class DiskFullError(OSError):
    """No space left on the device while writing ``path``."""

    def __init__(self, path: str):
        free = _free_bytes(os.path.dirname(os.path.abspath(path)))
        where = f" ({free / 2 ** 20:.1f} MiB free there)" if free is not None else ""
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}{where}")
        self.filename = path

    def __str__(self) -> str:
        return self.strerror


def _free_bytes(directory: str) -> int | None:
    while directory and not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    try:
        return shutil.disk_usage(directory or ".").free
    except OSError:
        return None


def disk_full(error: BaseException, directory: str) -> bool:
    """Whether ``error`` (raised while writing into ``directory``) means the disk is full."""
    if isinstance(error, DiskFullError):
        return True
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = str(error)
    if any(s in text for s in _CXX_WRITE_ERRORS):
        free = _free_bytes(directory)
        return free is not None and free < LOW_SPACE_BYTES
    return False
