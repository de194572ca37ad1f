"""Crash-safe file writes and small file-system helpers, shared by every command that writes a result file
(no torch import here)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from rlhfkit.errors import SaveError


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a temporary sibling, fsync, rename, fsync the directory: a reader (or a crash) sees the
    old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def io_error_message(exc: BaseException) -> str | None:
    """ "disk full" or the system's words for an I/O error (OSError, or safetensors' own error that wraps
    one); None for anything else, which is a bug to show with its traceback."""
    text = str(exc)
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "disk full"
        return exc.strerror or text or type(exc).__name__
    found = _OS_ERROR.search(text)
    if type(exc).__name__ == "SafetensorError" and found:
        return "disk full" if int(found.group(2)) == errno.ENOSPC else found.group(1)
    return None


# how safetensors (Rust) words an OS error: "Error while serializing: I/O error: File too large (os error 27)"
_OS_ERROR = re.compile(r"(?:I/O error: )?([^:()]+?) \(os error (\d+)\)")


@contextlib.contextmanager
def saving(what: str) -> Iterator[None]:
    """Turn an I/O error inside the block (disk full, no permission, a file too large) into a `SaveError`:
    one line, "<reason> while writing <what>"; any other exception passes through untouched."""
    try:
        yield
    except Exception as exc:
        reason = io_error_message(exc)
        if reason is None:
            raise
        raise SaveError(f"{reason} while writing {what}") from None


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry to disk, so a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root to disk, so a rename after it is durable."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (e.g. so two runs never convert the same model at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
