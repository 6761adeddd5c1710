"""One writer per run store: an exclusive lock taken before anything is written.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``RUN_DIR/writer.lock``, held for
as long as a :class:`~compass_monitor.store.writer.RunWriter` writes (creation,
resume, appending, until ``finalize`` or release). Why ``flock``:

* taking it is atomic: of two processes that try at the same moment exactly one
  gets it, so no two creators or resumers ever both write metadata;
* the kernel drops it when its holder dies, ``kill -9`` included, so a lock
  left by a crash is never stale: the file stays and is simply free. The lock
  file is never deleted (deleting it while another process waits on it would
  let two holders in);
* the holder's pid, host and process start time are written into the file, so
  a refusal names the other writer.

In one process, a second writer on the same store (a resume after a monitor
that was never closed) *takes the lock over*: the first writer is revoked and
every later write through it raises :class:`~compass_monitor.store.schema.StoreError`.

On a file system without ``flock`` (some NFS or Lustre mounts answer ``ENOLCK``
or ``EOPNOTSUPP``) the lock falls back to the recorded owner: a live owner on
this host refuses, anything else is taken over with a warning that one writer
per run is not enforced there.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from . import schema
from .commit import writer_alive, writer_identity

__all__ = ["WriterLock", "lock_owner", "locked_by_another"]

log = logging.getLogger(__name__)

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
# Locks this process holds, by store path (for an in-process takeover).
_HELD: dict[str, "WriterLock"] = {}
_HELD_LOCK = threading.Lock()


def lock_owner(root: Path | str) -> dict[str, Any] | None:
    """The owner recorded in the store's lock file (the last holder; it may be gone). None if none is recorded."""
    try:
        with open(Path(root) / schema.LOCK_FILE, encoding="utf-8") as handle:
            owner = json.loads(handle.read() or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _wait_for_owner(root: Path, timeout: float = 0.5) -> dict[str, Any] | None:
    """The lock's owner; a holder that has just taken the lock records itself within microseconds."""
    deadline = time.monotonic() + timeout
    while True:
        owner = lock_owner(root)
        if owner or time.monotonic() > deadline:
            return owner
        time.sleep(0.005)


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (it has not recorded its pid yet)"
    since = owner.get("since")
    when = ""
    if isinstance(since, (int, float)):
        when = f", {owner.get('purpose', 'writing')} since " + _dt.datetime.fromtimestamp(since, _dt.timezone.utc).strftime("%H:%M:%S UTC")
    return f"pid {owner.get('pid')} on host {owner.get('host')}{when}"


def _locked_error(root: Path, owner: dict[str, Any] | None) -> schema.StoreLockedError:
    return schema.StoreLockedError(
        f"{root}: another writer holds this run store ({_describe(owner)}); two writers would corrupt it. "
        "Wait for it to finish or stop it, or choose another run directory; nothing was written."
    )


def locked_by_another(root: Path | str) -> schema.StoreLockedError | None:
    """The refusal to give if another process holds the store's writer lock now, else None. Writes nothing.

    Probes with a shared, non-blocking ``flock`` on the lock file (released at once).
    """
    root = Path(root)
    with _HELD_LOCK:
        held = _HELD.get(os.path.realpath(root))
    if held is not None and held._fd is not None:
        return None  # this process's own writer: its caller decides
    try:
        fd = os.open(root / schema.LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _locked_error(root, _wait_for_owner(root))
    except OSError:
        return None  # no file locks here: acquire() decides from the recorded owner
    finally:
        os.close(fd)
    return None


class WriterLock:
    """The exclusive writer lock of one run store (module docstring). Use :meth:`acquire`."""

    def __init__(self, root: Path, fd: int | None, key: str, *, enforced: bool) -> None:
        self.root = root
        self._fd = fd
        self._key = key
        self.enforced = enforced
        self.revoked = False

    @classmethod
    def acquire(cls, root: Path | str, *, purpose: str, takeover: bool = False) -> "WriterLock":
        """Take the lock of the store directory ``root`` (which must exist), or refuse.

        Args:
            purpose: ``creating`` or ``resuming`` (recorded, and shown to a refused writer).
            takeover: a lock this process already holds on ``root`` passes to the new
                holder (the old one is revoked); otherwise it refuses.

        Raises:
            StoreLockedError: another process (or, without ``takeover``, this one) writes the store.
            StoreError: the lock file cannot be created (read-only store, disk full).
        """
        root = Path(root)
        key = os.path.realpath(root)
        with _HELD_LOCK:
            held = _HELD.get(key)
            if held is not None and held._fd is not None:
                if not takeover:
                    raise schema.StoreLockedError(
                        f"{root}: this process already writes this run store; close that monitor first "
                        "(or resume, which takes it over)"
                    )
                new = cls(root, held._fd, key, enforced=held.enforced)
                held._fd, held.revoked = None, True
                new._record(purpose)
                _HELD[key] = new
                return new
            path = root / schema.LOCK_FILE
            try:
                # O_NOFOLLOW: a lock file that is a symlink is refused, never followed out of the store.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise schema.StoreError(f"{root}: cannot create the writer lock {path.name} ({exc.strerror or exc})") from exc
            enforced = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _locked_error(root, _wait_for_owner(root)) from None
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise schema.StoreError(f"{root}: cannot lock {path.name} ({exc.strerror or exc})") from exc
                enforced = False
                owner = lock_owner(root)
                if owner and owner.get("pid") != os.getpid() and writer_alive(owner, any_status=True):
                    os.close(fd)
                    raise schema.StoreLockedError(
                        f"{root}: another writer holds this run store ({_describe(owner)}); two writers would corrupt it. "
                        "Wait for it to finish or stop it; nothing was written."
                    ) from None
                log.warning(
                    "compass-monitor: %s does not support file locks (%s); one writer per run store is not enforced there",
                    root,
                    exc.strerror,
                )
            lock = cls(root, fd, key, enforced=enforced)
            try:
                lock._record(purpose)
            except OSError as exc:
                lock._close()
                raise schema.StoreError(f"{root}: cannot write the writer lock ({exc.strerror or exc})") from exc
            _HELD[key] = lock
            return lock

    def _record(self, purpose: str) -> None:
        assert self._fd is not None
        payload = json.dumps({**writer_identity(), "purpose": purpose, "since": time.time()}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, payload, 0)

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock (not released, not taken over)."""
        return self._fd is not None and not self.revoked

    def check(self) -> None:
        """Raise if this writer lost the store to another writer of this process.

        Raises:
            StoreLockedError: the lock was taken over (a resume in this process) or released.
        """
        if not self.held:
            why = "another writer of this process took it over (resume)" if self.revoked else "its lock was released"
            raise schema.StoreLockedError(f"{self.root}: this writer no longer owns the run store: {why}")

    def release(self) -> None:
        """Give the lock up (idempotent). The file stays."""
        with _HELD_LOCK:
            if _HELD.get(self._key) is self:
                del _HELD[self._key]
            self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(fd)
