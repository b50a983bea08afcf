"""One job per output folder: an exclusive lock file inside the folder.

    with FolderLock(out_dir):           # FolderBusy (one line naming pid and host) when taken
        ... write into out_dir ...

Used by every job that writes a folder: ``shards.writer.run_sharded_job`` (``wm ingest``,
``wm collect``), ``wm label`` (one lock per sidecar shard, so that the disjoint ``--shards i/N``
ranges of a Slurm array still run side by side) and ``wm train`` (rank 0 locks the run folder).

How it works. The lock file (``<folder>/.lock`` by default) is taken with ``fcntl.flock``. The
kernel drops the lock when the holder's last descriptor closes, however the process ends
(``kill -9``, the OOM killer, a crash, a lost node on NFS once its lease expires), so a lock file
left by a dead process is simply taken over by the next job (with a warning naming the dead
holder): there is nothing to clean up by hand. The file holds JSON ``{pid, host, command,
started}`` for the error message of a refused job. A clean release deletes the file first (while
still holding it; an acquirer that then finds it has locked a deleted file retries), so a finished
job leaves nothing in its folder. Processes forked while a lock is held (e.g. DataLoader workers)
close their inherited copy at once: an orphaned child never keeps a dead job's folder locked.

Not guarded: two threads of one process (a second ``FolderLock`` on a held folder in the same
process is refused like any other, naming this process). File systems without ``flock`` support
get a warning and no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_HELD: set[FolderLock] = set()  # locks this process holds (until released, or the process ends)


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock; the one-line message names folder and holder."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder or {}


def _command() -> str:
    """This process's command line, one line (``python -m wm_pipeline ...`` shows as ``wm ...``)."""
    argv = list(sys.argv) or [""]
    prog = Path(argv[0]).name
    if prog == "__main__.py":
        prog = "wm" if Path(argv[0]).parent.name == "wm_pipeline" else f"python -m {Path(argv[0]).parent.name}"
    return " ".join(shlex.join([prog, *argv[1:]]).split())[:500]


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that has not written its name yet"
    cmd = str(holder.get("command", ""))
    cmd = cmd if len(cmd) <= 160 else cmd[:157] + "..."
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}" + (
        f": {cmd}" if cmd else ""
    )


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """The ``{pid, host, command, started}`` recorded in a lock file (None: absent or unreadable)."""
    try:
        return _parse(Path(path).read_bytes())
    except OSError:
        return None


class FolderLock:
    """Exclusive lock on ``folder`` (created if missing) through the file ``folder/name``.

    ``what`` names the locked thing in the error (default ``output folder <folder>``); ``wait``
    seconds to retry before giving up (0: refuse at once). Use as a context manager, or
    ``acquire()`` / ``release()``.
    """

    def __init__(
        self,
        folder: str | Path,
        name: str = LOCK_NAME,
        *,
        what: str | None = None,
        wait: float = 0.0,
        command: str | None = None,
    ):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what or f"output folder {self.folder}"
        self.wait = wait
        self.command = command
        self._fd: int | None = None
        self._pid: int | None = None  # the process that holds it (a forked child does not)

    @property
    def held(self) -> bool:
        return self._pid == os.getpid()

    def _busy(self, fd: int) -> FolderBusy:
        holder = None
        for _ in range(20):  # the holder writes its name right after locking: give it a moment
            holder = _parse(os.pread(fd, 1 << 16, 0))
            if holder:
                break
            time.sleep(0.025)
        mine = holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
        who = "this very process" if mine else "another job"
        return FolderBusy(
            f"{self.what} is in use by {who} ({_describe(holder)}); one job per folder at a time: "
            f"wait for it to finish or stop it (its lock {self.path} is released when it ends)",
            holder,
        )

    def acquire(self) -> FolderLock:
        if self.held:
            raise RuntimeError(f"{self.path}: already held by this FolderLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    os.close(fd)
                    time.sleep(0.05)
                    continue
                busy = self._busy(fd)
                os.close(fd)
                raise busy from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _UNSUPPORTED:
                    raise
                log.warning(
                    "%s: the file system does not support locks (%s): one job per folder is not enforced",
                    self.path,
                    e.strerror,
                )
                self._pid = os.getpid()
                return self
            try:  # the holder may have released (deleted) the file between our open and our flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        previous = os.pread(fd, 1 << 16, 0)
        if previous:  # a clean release deletes the file: this one was left by a process that died
            log.warning(
                "%s: taking over the lock left by %s, which is no longer running",
                self.path,
                _describe(_parse(previous)) if _parse(previous) else "an unreadable lock file",
            )
        doc = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command or _command(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        data = json.dumps(doc, sort_keys=True).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd, self._pid = fd, os.getpid()
        _HELD.add(self)
        return self

    def release(self) -> None:
        if not self.held:
            return
        fd, self._fd, self._pid = self._fd, None, None
        _HELD.discard(self)
        if fd is None:  # unsupported file system: nothing was locked
            return
        try:
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    os.unlink(self.path)  # still holding it: a waiting acquirer sees the file is gone
            except FileNotFoundError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"FolderLock({str(self.path)!r}, held={self.held})"


def _forget_in_child() -> None:
    """After fork: close the child's copies of held locks (without unlocking the parent's)."""
    for lock in list(_HELD):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
        lock._fd = lock._pid = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
