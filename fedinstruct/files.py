"""Atomic, durable writes: a reader sees the old file (or folder) or the new one, never a torn one.

Everything is written under a unique temporary name next to its target, flushed and fsynced,
then renamed over the target; the parent folder is fsynced after the rename, so a finished
write survives a crash or power loss (checkpoints and cached models depend on it).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where the OS cannot fsync a directory)."""
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


def _fsync_tree(folder: Path) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Replace `path` with what `write(handle)` writes to a binary file handle."""
    path = Path(path)
    tmp = _temp_sibling(path)
    # os.open with 0o666 honours the umask, as a plain open() would (mkstemp makes 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` (UTF-8)."""
    data = text.encode()
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_folder(
    target: str | Path, build: Callable[[Path], object], *, replace: bool = False
) -> Path:
    """A folder `build(folder)` fills, built next to `target` and renamed into place.

    Without `replace`, an existing `target` is returned as is (`build` does not run), and when
    a concurrent builder renames its folder first, its folder is kept and ours dropped. With
    `replace`, a finished build replaces the existing folder (briefly absent while swapped).
    """
    target = Path(target)
    if target.exists() and not replace:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        build(tmp)
        _fsync_tree(tmp)
        if replace and target.exists():
            old = _temp_sibling(target)
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    return target
