"""Atomic, durable writes: a reader sees the old file (or folder) or the new one, never a torn one.

Everything is written under a unique temporary name next to its target, flushed and fsynced,
then renamed over the target; the parent folder is fsynced after the rename, so a finished
write survives a crash or power loss (checkpoints and cached models depend on it).

A folder that replaces another is swapped in with one atomic exchange where the OS has one
(Linux renameat2), so the target is never absent; elsewhere the old folder is first renamed
to a fixed name (`previous_copy`) that a reader falls back to after a crash.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")


def previous_copy(target: str | Path) -> Path:
    """Where a replaced folder waits, complete, while its successor is renamed into place."""
    target = Path(target)
    return target.with_name(f".{target.name}.previous")


def _discard(folder: Path) -> None:
    """Remove a folder: first renamed away (atomic), so no half-deleted copy keeps its name."""
    if not folder.exists():
        return
    doomed = _temp_sibling(folder)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _load_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc/Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the OS or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


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
    `replace`, a finished build replaces the existing folder; a crash at any point leaves the
    old folder or the new one complete, at `target` or, where the OS cannot swap two folders
    atomically, at `previous_copy(target)`.
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
        _fsync_dir(target.parent)
        if replace and target.exists() and _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, under the temporary name
        elif replace and target.exists():
            previous = previous_copy(target)
            _discard(previous)  # from an interrupted swap, superseded: `target` is complete
            os.replace(target, previous)
            try:
                _fsync_dir(target.parent)
                os.replace(tmp, target)
            except BaseException:
                os.replace(previous, target)
                raise
        elif replace:
            os.replace(tmp, target)
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
    if replace:
        _discard(previous_copy(target))  # the old folder of this or an interrupted swap
    return target
