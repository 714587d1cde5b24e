"""Writing an image (a run list from ``classify``) into a sparse raw file.

Data runs are copied in the kernel (reflink where possible, else
copy_file_range); zero runs stay holes. The file appears under its final
name only when complete and fsynced (temp file, rename, fsync directory), so
an export interrupted by a crash never looks like a finished one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from cyclemirror.errors import AlreadyExistsError
from cyclemirror.store import fileops


def write_image(path: str, size: int, runs: Iterable[tuple[int, int, str, int]]) -> None:
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise AlreadyExistsError(f"export target {path} already exists; remove it or pick another path")
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise fileops.store_error(f"creating export file {tmp}", exc) from exc
    try:
        os.ftruncate(fd, size)
        copier = fileops.KernelCopier()
        for offset, length, kind, src_fd in runs:
            if kind == "data":
                copier.copy(src_fd, fd, offset, length)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        fileops.fsync_dir(os.path.dirname(path))
    except OSError as exc:
        raise fileops.store_error(f"exporting to {path}", exc) from exc
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
