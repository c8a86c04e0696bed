"""File writes that never leave half a file behind."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# What a full disk or a file-size limit makes a write raise.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """A write that did not fit: the message names the file, what it needed and what was free."""


def _megabytes(n: float) -> str:
    return f"{n / 2**20:.0f} MB"


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], size_hint: int | None = None
) -> None:
    """`write(tmp)` to a private temporary next to `path`, then rename it over `path`: a killed job
    or a concurrent writer (DDP ranks) never sees a torn file. If the write fails, the temporary is
    removed at once and the file already at `path` stays as it was; a full disk (or quota, or file
    size limit) is a `DiskFullError` that says so in one sentence (`size_hint`: the bytes the write
    needs, if the caller knows)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            free = shutil.disk_usage(path.parent).free
            needed = (
                f"about {_megabytes(size_hint)}"
                if size_hint
                else f"more than the {_megabytes(written)} written"
            )
            what = (
                "the file size limit (ulimit -f) was reached"
                if exc.errno == errno.EFBIG
                else "the disk is full"
            )
            raise DiskFullError(
                exc.errno,
                f"could not write '{path}': {what} (it needed {needed}, {_megabytes(free)} are "
                f"free there); the partial file was removed and the previous '{path.name}' is "
                "intact, so free space (or point paths.output_dir elsewhere) and rerun the "
                "command to resume.",
            ) from None
        raise
