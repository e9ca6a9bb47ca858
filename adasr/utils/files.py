"""Atomic file writes: a file appears under its final name complete or not at all.

The data goes to a temporary file in the destination folder (``.<name>.<random>.tmp``), is flushed and fsynced, and
is then renamed over the destination with ``os.replace`` (atomic on POSIX and on Windows within one volume). A write
that fails (a full disk, a file-size limit, an exception in the writer) removes the temporary file and re-raises; a
process killed mid-write leaves only the temporary file, which :func:`remove_temp_files` deletes later.
"""
import os
import os.path as osp
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Iterator, List

TEMP_SUFFIX = '.tmp'


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` when the ``with`` block ends without an exception.

    Example::

        with atomic_write('model.pth') as f:
            torch.save(state, f)

    Raises:
        Whatever the block or the file system raises; the temporary file is removed and ``path`` is untouched.
    """
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(path) + '.', suffix=TEMP_SUFFIX, dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(data)


def remove_temp_files(folder: str) -> List[str]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` when a process was killed mid-write.

    Only call this on a folder no other process is writing to (a training run's own ``models/`` and
    ``training_states/``). Returns the paths removed; a missing folder is not an error.
    """
    removed = []
    if not osp.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        path = osp.join(folder, name)
        if name.startswith('.') and name.endswith(TEMP_SUFFIX) and osp.isfile(path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed
