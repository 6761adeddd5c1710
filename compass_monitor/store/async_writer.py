"""A background thread that writes snapshots, so the training thread only hands them off.

The training thread submits host numpy arrays (a :class:`SnapshotRecord`) to a
bounded queue and goes on; one writer thread encodes and writes them in order
(``RunWriter.append``) and commits each. When the queue is full, the policy is
explicit (``MonitorConfig.when_queue_full``):

* ``block``: the training thread waits for a free slot (no snapshot is lost);
* ``skip``: the snapshot is dropped with a warning, and the gap is recorded in
  the store (``commit.json`` ``gaps``; shown by ``inspect`` and ``summary``).
  The monitor asks :meth:`AsyncWriter.full` *before* measuring, so a skipped
  snapshot costs the training thread nothing, and ``flips_since_previous`` of
  the next stored snapshot is counted against the previous *stored* one.

A failure in the writer thread (disk full, an unwritable store) never raises
into training: it is logged, kept in :attr:`AsyncWriter.error`, every later
submission is refused, and the monitor (which checks ``error`` on every step)
disables itself. With ``queue_size=0`` there is no thread: each snapshot is
written synchronously in the caller (errors are caught the same way). Only
``Exception`` counts as a writer failure: a ``KeyboardInterrupt`` or
``SystemExit`` raised during a synchronous write stops the writer (the store
keeps its committed snapshots) and propagates, so Ctrl-C always stops training.
Stopping (``close``, ``abort``, ``release``) gives the store's writer lock up.

Memory: at most ``queue_size`` snapshots wait in the queue, plus one being
written: each holds the packed masks (1 bit per weight) and row/column counts.
While idle, the thread rewrites the commit file's heartbeat every
``heartbeat_interval`` seconds, so a viewer can tell a live run from a dead one.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .writer import RunWriter, SnapshotRecord

__all__ = ["AsyncWriter", "QUEUE_POLICIES", "DEFAULT_HEARTBEAT_INTERVAL"]

log = logging.getLogger(__name__)

QUEUE_POLICIES = ("block", "skip")
DEFAULT_HEARTBEAT_INTERVAL = 30.0
_STOP = object()
# Writers of this process by store path: a resumed run takes its store over from a
# monitor that was never closed (e.g. after an exception), which must stop writing.
_ACTIVE: dict[str, "weakref.ref[AsyncWriter]"] = {}
_ACTIVE_LOCK = threading.Lock()


class AsyncWriter:
    """Runs a :class:`RunWriter` on a background thread behind a bounded queue."""

    def __init__(
        self,
        writer: RunWriter,
        *,
        queue_size: int = 2,
        when_full: str = "block",
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        if when_full not in QUEUE_POLICIES:
            raise ValueError(f"when_full must be one of {QUEUE_POLICIES}, got {when_full!r}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size!r}")
        self.writer = writer
        self.queue_size = int(queue_size)
        self.when_full = when_full
        self.heartbeat_interval = float(heartbeat_interval)
        writer.heartbeat_interval = self.heartbeat_interval if self.queue_size else None
        #: The exception that stopped the writer (None while healthy).
        self.error: BaseException | None = None
        self.error_context = ""
        self.skipped = 0
        self._lock = threading.RLock()
        self._gap_lock = threading.Lock()
        # (jobs submitted before the gap, step): a gap is recorded after the jobs submitted before it.
        self._pending_gaps: list[tuple[int, int]] = []
        self._submitted = 0  # jobs handed to the queue (training thread)
        self._done = 0  # jobs the writer thread finished
        self._closed = False
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(self.queue_size, 1))
        self._thread: threading.Thread | None = None
        self._key = os.path.realpath(writer.path)
        with _ACTIVE_LOCK:
            _ACTIVE[self._key] = weakref.ref(self)
        if self.queue_size:
            self._thread = threading.Thread(target=self._run, name="compass-monitor-writer", daemon=True)
            self._thread.start()
            # A process that exits without close() still gets its queued snapshots written:
            # threading's exit hooks run before the thread pools (which zarr's I/O uses)
            # shut down, in reverse order of registration; ``atexit`` would be too late.
            ref = weakref.ref(self)
            self._atexit = lambda: (lambda w: w._drain_at_exit() if w is not None else None)(ref())
            register = getattr(threading, "_register_atexit", None)
            try:
                (register or atexit.register)(self._atexit)
            except RuntimeError:  # interpreter already shutting down
                pass

    # -- facts -------------------------------------------------------------------
    @property
    def path(self):  # noqa: ANN201 - pathlib.Path
        return self.writer.path

    @property
    def num_snapshots(self) -> int:
        """Snapshots committed so far (the writer thread may still hold later ones)."""
        return self.writer.num_snapshots

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet done (queued or being written)."""
        return self._queue.unfinished_tasks if self._thread else 0

    def full(self) -> bool:
        """Whether a submission now would find the queue full (never true in synchronous mode)."""
        return bool(self._thread) and self._queue.full()

    # -- the writer thread ---------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=self.heartbeat_interval)
            except queue.Empty:
                self._guard("heartbeat", self.writer.heartbeat, gaps_upto=self._done)
                continue
            try:
                if job is _STOP:
                    return
                seq, *call = job
                self._guard(*call, gaps_upto=seq)
            finally:
                self._done += 1
                self._queue.task_done()

    def _guard(self, what: str, fn: Callable[..., None], *args: Any, gaps_upto: int | None = None) -> bool:
        """Run one writer call unless the writer failed; keep (and log) the first failure."""
        with self._lock:
            if self.error is not None:
                return False
            try:
                self._take_gaps(gaps_upto)
                fn(*args)
                return True
            except Exception as exc:  # noqa: BLE001 - a writer failure must never reach training
                self.error = exc
                self.error_context = what
                log.error("compass-monitor: the run-store writer failed (%s): %s: %s", what, type(exc).__name__, exc)
                log.debug("writer failure", exc_info=True)
                return False
            except BaseException as exc:
                # Ctrl-C or SystemExit: the write may be half done, so the writer stops (the store
                # keeps every committed snapshot); in the caller's thread the exception goes on.
                self.error = exc
                self.error_context = f"{what}, interrupted"
                if threading.current_thread() is self._thread:
                    log.error("compass-monitor: the run-store writer thread was stopped (%s): %s", what, type(exc).__name__)
                    return False
                raise

    def _put(self, job: Any) -> bool:
        if self._thread is None:  # synchronous mode
            return self._guard(*job)
        seq = self._submitted
        while True:
            if self.error is not None:
                return False
            try:
                self._queue.put((seq, *job), timeout=0.25)
                self._submitted += 1
                return True
            except queue.Full:
                continue

    # -- submissions (training thread) -------------------------------------------------
    def submit_base(self, **kwargs: Any) -> bool:
        """Queue ``RunWriter.write_base(**kwargs)`` (always blocks for a slot: the base is never skipped)."""
        return self._submit(("base", lambda: self.writer.write_base(**kwargs)))

    def submit(self, record: SnapshotRecord) -> bool:
        """Hand a snapshot to the writer. Returns False if it was not accepted (skipped or writer failed).

        Never raises. With ``when_full="skip"`` and a full queue the snapshot is
        dropped and the gap recorded (callers that can avoid the work should
        check :meth:`full` first and call :meth:`note_gap`).
        """
        if self.error is not None or self._closed:
            return False
        if self.when_full == "skip" and self.full():
            self.note_gap(record.step)
            return False
        return self._submit((f"snapshot of step {record.step}", self.writer.append, record))

    def _submit(self, job: tuple[Any, ...]) -> bool:
        if self.error is not None or self._closed:
            return False
        return self._put(job)

    def note_gap(self, step: int) -> None:
        """Record a snapshot that was not stored because the queue was full. Never raises."""
        self.skipped += 1
        if self.skipped == 1 or self.skipped % 100 == 0:
            log.warning(
                "compass-monitor: the run-store writer is behind (queue of %d full); skipped the snapshot of step %d "
                "(%d skipped so far; recorded as a gap in the store). Raise writer_queue, snapshot less often, or use "
                "when_queue_full='block'.",
                self.queue_size,
                step,
                self.skipped,
            )
        # Not through the (full) queue, and without waiting for the writer's lock: the
        # writer thread moves pending gaps into the store state before its next commit.
        with self._gap_lock:
            self._pending_gaps.append((self._submitted, int(step)))
        if self._thread is None:
            with self._lock:
                self._take_gaps()

    def _take_gaps(self, upto: int | None = None) -> None:
        """Record the gaps noted before job ``upto`` was submitted (all if None) in the store state."""
        with self._gap_lock:
            ready = [step for mark, step in self._pending_gaps if upto is None or mark <= upto]
            self._pending_gaps = [(mark, step) for mark, step in self._pending_gaps if not (upto is None or mark <= upto)]
        for step in ready:
            self.writer.note_gap(step)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job is written (or the writer failed). True if the queue drained."""
        if self._thread is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining if remaining is not None else 0.5)
        return True

    def call(self, fn: Callable[[RunWriter], Any]) -> Any:
        """Run ``fn(writer)`` in the caller's thread after the queue drained, holding the writer lock.

        Exceptions propagate (callers decide); the writer thread is idle meanwhile.
        """
        self.flush()
        with self._lock:
            return fn(self.writer)

    def close(self, status: str = "finished", **event: Any) -> None:
        """Write everything queued, then finalize the store with ``status`` and stop the thread.

        If the writer had failed, the store is only marked ``status`` (arrays as they are).
        Never raises; a failure here is kept in :attr:`error`.
        """
        if self._closed:
            return
        self.flush()
        if self.error is None:
            self._guard(f"finalize ({status})", self.writer.finalize, status)
        self._stop()

    def abort(self, status: str = "disabled", **event: Any) -> None:
        """Stop after writing what is queued (if the writer is healthy), and mark the run ``status``. Never raises."""
        if self._closed:
            return
        if self.error is None:
            self.flush()
        with self._lock:
            try:
                self._take_gaps()
                self.writer.mark(status, **event)
            except Exception as exc:  # noqa: BLE001
                log.error("compass-monitor: could not mark the run store %s: %s", status, exc)
        self._stop()

    @classmethod
    def release(cls, path: Any) -> bool:
        """Make any writer of this process on ``path`` write what it holds and stop for good.

        Its monitor then disables itself at its next step, without touching the
        store (which now belongs to the caller). True if there was one.
        """
        with _ACTIVE_LOCK:
            ref = _ACTIVE.pop(os.path.realpath(path), None)
        old = ref() if ref is not None else None
        if old is None or old._closed:
            return False
        old.flush(timeout=120)
        if old.error is None:
            old.error = RuntimeError("another monitor in this process took the run store over (resume)")
            old.error_context = "released"
        old._stop()
        return True

    def _stop(self) -> None:
        self._closed = True
        with _ACTIVE_LOCK:
            ref = _ACTIVE.get(self._key)
            if ref is not None and ref() is self:
                del _ACTIVE[self._key]
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            atexit.unregister(self._atexit)  # (a threading exit hook stays registered; it is a no-op now)
            still_writing = self._thread.is_alive()
            self._thread = None
            if still_writing:  # after 30 s: it keeps the store's lock until the process ends
                return
        self.writer.release()

    def _drain_at_exit(self) -> None:
        if self._closed or self._thread is None:
            return
        if self.pending:
            log.warning("compass-monitor: the process exits without monitor.close(); writing %d queued snapshot(s)", self.pending)
        self.flush(timeout=120)
        self._stop()
