"""Where output files are opened: ``claim_outputs([(what, path), ...])`` takes one lock per output for
the life of a stream (a second writer is refused at once, naming the first) and refuses an existing file
unless ``overwrite``; ``FileSink`` is the raw file the muxer and raw records write through, which can cut
a file back to its last complete block after a failed write. File-system policy only: ``media.py`` never
decides whether a path may be written. Locks and sinks: ``docs/ARCHITECTURE.md``, "Output files"."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from hallolive_rt.errors import MediaError, OutputBusy, OutputClaimError, OutputExists

__all__ = ["OutputClaimError", "OutputBusy", "OutputExists", "OutputLock", "claim_outputs", "FileSink",
           "check_writable", "lock_path"]


def check_writable(path: Path, what: str) -> Path:
    """``path`` as a Path, or MediaError if a file cannot be written there (a folder, no folder, read-only)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise MediaError(f"{what} path {str(path)!r} is a directory, not a file")
    if not parent.is_dir():
        raise MediaError(f"{what} path {str(path)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise MediaError(f"{what} path {str(path)!r} is not writable")
    return path


def lock_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def _holder(lock: Path) -> str:
    """Who holds ``lock``, from what it wrote (waits briefly: the holder writes right after locking)."""
    for _ in range(20):
        try:
            info = json.loads(lock.read_text() or "null")
        except (OSError, ValueError):
            info = None
        if info:
            return f"PID {info.get('pid')} ({info.get('command')}), writing since {info.get('since')}"
        time.sleep(0.025)
    return "a process that did not say who it is"


class OutputLock:
    """An exclusive, non-blocking lock on one output path, held until ``release`` (or process exit)."""

    def __init__(self, path: str | os.PathLike, what: str = "output"):
        self.path, self.what = Path(path), what
        self.lock = lock_path(self.path)
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; one writer per file is then the user's care
            return self
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusy(f"{self.what} {str(self.path)!r} is being written by another process: "
                                 f"{_holder(self.lock)}. Wait for it to end, stop it, or choose another "
                                 f"path") from None
            # the holder before us may have removed the file between our open and our lock: ours must be
            # the file at the path now, or two writers would each hold a lock on a different file
            try:
                same = os.stat(self.lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "command": shlex.join(sys.argv) or sys.executable,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.lock.unlink()  # before unlocking: a newcomer then finds no file, or a file it can lock
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def claim_outputs(outputs: Iterable[tuple[str, str | os.PathLike | None]], *,
                  overwrite: bool = False) -> Iterator[list[OutputLock]]:
    """Lock every ``(what, path)`` output (``None`` paths skipped) for the body's duration, then refuse an
    existing one unless ``overwrite``. Everything taken is released on any exit, the refusals included."""
    locks: list[OutputLock] = []
    try:
        seen: dict[Path, str] = {}
        for what, path in outputs:
            if path is None:
                continue
            real = Path(path).resolve()
            if real in seen:
                raise OutputClaimError(f"{seen[real]} and {what} name the same file {str(path)!r}: give each "
                                       f"output its own path")
            seen[real] = what
            locks.append(OutputLock(path, what).acquire())
        if not overwrite:
            for lk in locks:
                if lk.path.exists():
                    raise OutputExists(f"{lk.what} {str(lk.path)!r} exists; pass --overwrite to replace it, or "
                                       f"choose another path")
        yield locks
    finally:
        for lk in reversed(locks):
            lk.release()


class FileSink(io.RawIOBase):
    """An unbuffered output file that can be cut back to its last complete block.

    ``commit()`` after a block is entirely on disk; ``error`` is the first OSError of a write (re-raised
    to the writer); once ``rollback()`` ran, further writes are dropped (a muxer closing after a failure
    must not append a trailer to a file that was cut back)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self._f = open(self.path, "wb", buffering=0)
        self.committed = 0
        self.error: OSError | None = None
        self._dropping = False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b) -> int:
        """Write all of ``b`` (a raw file may take part of it per call) or raise the first OSError."""
        view = memoryview(b).cast("B")
        if self._dropping:
            return len(view)
        done = 0
        try:
            while done < len(view):
                n = self._f.write(view[done:])
                if not n:
                    raise OSError(errno.EIO, f"{self.path}: the write made no progress")
                done += n
        except OSError as e:
            self.error = self.error or e
            raise
        return done

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def commit(self) -> int:
        """Everything written so far is a complete block: the size a rollback returns to."""
        self.committed = self._f.seek(0, io.SEEK_END)
        return self.committed

    def rollback(self) -> int:
        """Cut the file back to the last commit and drop any later write; returns the size kept."""
        self._dropping = True
        with contextlib.suppress(OSError):  # shrinking a file needs no space; a failure leaves the tail
            self._f.truncate(self.committed)
        return self.committed

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()
