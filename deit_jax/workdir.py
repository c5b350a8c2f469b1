"""The run directory: checked writable before anything is written, and one writer at a time.

Two runs on one workdir would overwrite each other's checkpoints (or crash inside Orbax), so
process 0 holds an exclusive ``fcntl.flock`` on ``workdir/.lock`` for the run's life. The kernel
drops the lock when the process ends however it ends (``kill -9`` included), so a killed run never
leaves it stuck. Multi-host runs share the workdir by design: only process 0 takes the lock.
Object-store workdirs (``gs://...``) cannot be locked; there the check is skipped with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from absl import logging

from deit_jax.errors import WorkdirError

LOCK_NAME = ".lock"


def is_remote(workdir: str) -> bool:
    return "://" in workdir


def check_writable(workdir: str) -> None:
    """Creates ``workdir`` and writes a probe file there, or raises :class:`WorkdirError`."""
    if is_remote(workdir):
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a directory: pick another path")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable",
               errno.EPERM: "is not writable", errno.ENOSPC: "is on a full disk",
               errno.ENOTDIR: "has a file as a parent"}.get(e.errno, f"cannot be written ({e})")
        raise WorkdirError(f"--workdir={workdir} {why}: pick a writable directory") from e


class WorkdirLock:
    """An exclusive lock on ``workdir`` held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        if is_remote(self.workdir):
            logging.warning("workdir %s is not a local path: cannot lock it; make sure no other "
                            "run writes it", self.workdir)
            return self
        path = os.path.join(self.workdir, LOCK_NAME)
        for _ in range(5):
            fd = self._lock_file(path)
            # A lock file unlinked (or replaced) between our open and our flock locks nothing
            # another run can see: lock again until the path names the file we hold.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise WorkdirError(f"cannot lock {path}: the file keeps being replaced; is another "
                               "program cleaning --workdir?")
        # Who holds it, for the message above (the lock itself is the flock, not this text).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        logging.info("locked %s (pid %d)", path, os.getpid())
        return self

    def _lock_file(self, path: str) -> int:
        low = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        # Kept on a high descriptor number: a library closing a stale low number (one reused
        # for this file) would otherwise drop the lock without a word.
        fd = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 512)
        os.close(low)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"cannot lock {path}: {e}") from e
            raise WorkdirError(
                f"another run is writing --workdir={self.workdir} ({holder}); wait for it to "
                "end, stop it, or pick another --workdir") from None
        return fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
