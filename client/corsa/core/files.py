"""Writing files: an OS or GDAL write error (disk full, I/O error, file size limit) becomes one
error naming the file, for every writer of the package."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rasterio._err import CPLE_BaseError
from rasterio.errors import RasterioError


class WriteError(RuntimeError):
    """A file could not be written (disk full, I/O error, file size limit); the message names it."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Writes of ``path`` (a file, or the product it belongs to) inside the block: an OS or GDAL
    write error becomes a WriteError naming the file and the cause. Removing the partial file is
    the writer's (they write under temporary names)."""
    try:
        yield
    except (OSError, RasterioError, CPLE_BaseError) as e:
        inner = e.__cause__ or e.__context__
        cause = (e.strerror if isinstance(e, OSError) and e.strerror else
                 str(inner if inner is not None and "previous exception" in str(e) else e).strip() or type(e).__name__)
        raise WriteError(f"writing {path} failed: {cause}") from e


def exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE): a reader of ``b`` sees the old
    folder or the new one, never neither. Elsewhere: two renames (an instant without ``b``)."""
    import ctypes
    import os

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    except (OSError, AttributeError):  # no renameat2 in this C library
        pass
    aside = b.with_name(b.name + ".old")
    b.rename(aside)
    a.rename(b)
    aside.rename(a)


@contextmanager
def product_lock(folder: Path) -> Iterator[None]:
    """One writer at a time in a product folder: an exclusive lock on the folder itself (flock of
    its directory: no file to leave behind; released when the block ends or the process dies); a
    second writer stops with an error naming the folder. A folder made here and left empty (the
    command failed before writing) is removed again."""
    import fcntl
    import os

    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WriteError(f"{folder} is being written by another corsa process: wait for it to finish, "
                             "or write elsewhere") from None
        yield
    finally:
        os.close(fd)
        if made and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
