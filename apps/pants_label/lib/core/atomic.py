"""The one way the app writes a file that must never be seen half-written.

Write to a temporary name in the destination's folder, fsync the file, rename it over the
destination (atomic on one filesystem), fsync the folder. A crash at any point leaves either the
old file or the new one, plus at most a temporary file whose name matches :data:`TMP_NAME`,
which start-up recovery (:mod:`lib.datastore.recovery`) removes.

Temporary names keep the destination's name as their tail (``.tmp-<12 hex>-v3.nii.gz``), since
writers such as nibabel choose the format by suffix.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: every temporary file or folder of an atomic write, and nothing else
TMP_NAME = re.compile(r"^\.tmp-[0-9a-f]{12}-")


def tmp_path(final: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``final`` (same folder, hence same filesystem)."""
    final = Path(final)
    return final.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{final.name}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable; best effort where the filesystem cannot fsync folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> Path:
    """Rename a complete, fsynced temporary file over ``final`` and make the rename durable."""
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


@contextmanager
def staged(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``final``'s content to; it is fsynced on success and
    removed on failure. The caller renames it with :func:`commit` when it is time (e.g. inside a
    database transaction that records it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    try:
        yield tmp
        fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(final: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` and put the result in place at ``final`` atomically."""
    final = Path(final)
    with staged(final) as tmp:
        write(tmp)
    try:
        return commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(final, lambda tmp: tmp.write_bytes(data))


def write_json_atomic(final: str | os.PathLike, data: Any) -> Path:
    return write_bytes_atomic(final, json.dumps(data, indent=1, default=str).encode())


@contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``final`` that becomes ``final`` when the block succeeds (an
    existing ``final`` is kept: another writer got there first) and is removed otherwise."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync_file(f)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = [
    "TMP_NAME",
    "tmp_path",
    "staged",
    "staged_dir",
    "commit",
    "atomic_write",
    "write_bytes_atomic",
    "write_json_atomic",
    "fsync_file",
    "fsync_dir",
]
