"""Atomic file writes: a file appears under its final name complete or not at all.

The data goes to a temporary file in the destination folder (``.<name>.<random>.adasr-tmp``: a suffix only adasr
writes, so the cleanup never touches another program's ``.tmp`` files), is flushed and fsynced, and
is then renamed over the destination with ``os.replace`` (atomic on POSIX and on Windows within one volume). A write
that fails (a full disk, a file-size limit, an exception in the writer) removes the temporary file and re-raises; a
process killed mid-write leaves only the temporary file, which :func:`remove_orphan_temporaries` deletes later. The
temporary file is locked (``flock``) while it is written, so the cleanup can tell a live writer's file from the
leftover of a killed one, and runs writing into the same folder at the same time stay safe.
"""
import glob
import os
import os.path as osp
import tempfile
import time
from contextlib import contextmanager
from typing import BinaryIO, Iterator, List

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted there, which protects live temporary files instead
    fcntl = None

TEMP_SUFFIX = '.adasr-tmp'  # the temporary files of atomic writes: .<name>.<random>.adasr-tmp (ours alone)


class OutputFolderError(OSError):
    """An output folder cannot be created or written to."""


class WriteError(OSError):
    """A file that could not be written (full disk, no permission, an encoder that refused it); the message names
    it."""


def error_text(e: BaseException) -> str:
    """A command-line message for ``e``: an OSError with a file (read-only disk, a file where a folder goes) as
    ``cannot use <file>: <reason>``, anything else as its own message."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f'cannot use {e.filename}: {e.strerror}'
    return str(e) or type(e).__name__


def _umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (Linux: ``/proc/self/status``);
    elsewhere set and restored at once (``os.umask`` has no read-only form)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
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
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
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


def remove_orphan_temporaries(folder: str, min_age: float = 60.0, recursive: bool = False) -> List[str]:
    """Delete the temporary files (``.<name>.*.adasr-tmp``) that interrupted :func:`atomic_write` calls left in
    ``folder`` (and in its sub-folders, hidden ones included, with ``recursive``); returns the paths removed (a
    missing folder is not an error). Other programs' files, ``.tmp`` ones included, are never touched.

    A file is removed only when no process holds its lock (its writer is gone) and it was last modified more than
    ``min_age`` seconds ago (which covers the instants before the lock is taken and between closing and renaming).
    Where files cannot be locked (Windows) a file still open cannot be deleted either.
    """
    removed = []
    now = time.time()
    folders = [sub for sub, _, _ in os.walk(folder)] if recursive else [folder]
    for tmp in sorted(t for f in folders for t in glob.glob(osp.join(glob.escape(f), '.*' + TEMP_SUFFIX))):
        try:
            if now - os.stat(tmp).st_mtime < min_age:
                continue
            if fcntl is None:
                os.unlink(tmp)  # fails while the writer has it open
            else:
                with open(tmp, 'rb') as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError while a writer holds it
                    os.unlink(tmp)
        except OSError:
            continue
        removed.append(tmp)
    return removed


def prepare_output_folder(folder: str) -> List[str]:
    """Create ``folder`` if needed, check that files can be written in it, and remove the temporary files of
    interrupted writes (:func:`remove_orphan_temporaries`); returns the paths removed.

    Raises:
        OutputFolderError: the folder cannot be created or written to (the message names it and says why).
    """
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputFolderError(f'output folder {folder} cannot be used: {e.strerror or e}') from e
    return remove_orphan_temporaries(folder)
