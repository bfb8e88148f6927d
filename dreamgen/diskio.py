"""Durable file operations for the store: atomic replace, fsync, the folder lock, disk errors.

A write that fails because of the disk (full, read-only, an I/O error) is a
``DiskError`` — a ``StoreError`` the CLI prints as one line and the daemon waits out —
never a bare ``OSError`` escaping from a task. ``probe_write`` is a real append (bytes,
fsync), because creating an empty file still succeeds on a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from pathlib import Path


class StoreError(Exception):
    """The output folder cannot be used (unwritable, a different run's config, corrupt)."""


class DiskError(StoreError):
    """A write to the output folder failed (disk full, read-only, I/O error).

    ``errno`` is the failing call's error number; everything reported before the
    failure is durable, and a resume after the cause is fixed loses nothing.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


# The errors a disk gives; anything else from a write is a bug or a permission problem,
# and is reported the same way (one line), because the cure is the same: fix OUT, resume.
DISK_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT, errno.EFBIG}
PROBE_BYTES = 4096


def describe(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the reason and its errno name."""
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text} ({name})" if name else text


def disk_error(what: str, exc: OSError) -> DiskError:
    """A ``DiskError`` for a failed ``what`` (``"writing shards/part-000001.jsonl.open"``)."""
    return DiskError(f"{what}: {describe(exc)}", exc.errno)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new, never half.

    On failure the temp file is removed (a full disk must not keep a half copy that
    takes the space a retry needs) and the OSError propagates; ``path`` is untouched.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two writers never share one
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def remove_stale_temps(*folders: Path) -> list[Path]:
    """Delete ``.*.tmp`` files left in ``folders`` by a killed writer; returns them.

    Only called with the folder lock held: no live writer can own one.
    """
    removed = []
    for folder in folders:
        for tmp in folder.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.is_file():
                    tmp.unlink()
                    removed.append(tmp)
    return removed


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lock_folder(out: Path) -> int:
    """Take the one-writer lock on ``out``: an ``flock`` on the folder itself.

    Locking the directory (not a file in it) means deleting a file cannot let a second
    writer in. Returns the open descriptor (closing it releases the lock; the kernel
    releases it on SIGKILL). Raises BlockingIOError if another process holds it.
    """
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def folder_locked(out: Path) -> bool:
    """Whether a writer holds ``out``'s lock now, asked without taking any lock.

    Reads ``/proc/locks`` (a shared-lock attempt would, for its instant, make a writer
    starting then refuse the folder); elsewhere falls back to that attempt.
    """
    try:
        st = os.stat(out)
    except OSError:
        return False
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _try_shared(out)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for row in table.splitlines():
        fields = row.split()
        if "FLOCK" in fields and "->" not in fields and dev in fields:
            return True
    return False


def _try_shared(out: Path) -> bool:
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock if we got it
    return False


def probe_write(folder: Path) -> str:
    """Append ``PROBE_BYTES`` to a probe file in ``folder``, fsync, remove; "" or the reason."""
    probe = folder / ".ready-probe"
    try:
        with open(probe, "ab") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return f"store not writable: {describe(exc)}"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return ""
