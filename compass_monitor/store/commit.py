"""The commit-file protocol of a run store: one module for the writer, the reader and the TUI.

``RUN_DIR/commit.json`` says how many snapshots are complete and how the run
stands (layout in ``docs/store-schema.md``). This module is the only code that
writes it (:func:`write_commit`: temporary file, fsync, ``os.replace``), reads
it (:func:`read_commit`: validated, so a damaged file is an error and never
numbers), and interprets it: whether the writing process still exists
(:func:`writer_alive`), and the one definition of a *stale* run
(:func:`stale_threshold`, :func:`liveness`).

Stale, defined once: a ``running`` run is

* ``crashed`` when its writer process, on this host, no longer exists;
* ``stale`` when its last commit is older than :func:`stale_threshold`: three
  heartbeat intervals for a writer that heartbeats while idle (the background
  writer), else three times the median interval between its recent snapshots
  (a synchronous writer only commits at snapshots), never less than
  ``minimum`` (``DEFAULT_STALE_AFTER`` = 120 s unless the caller says);
* ``live`` otherwise.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import schema

__all__ = [
    "DEFAULT_STALE_AFTER",
    "UNKNOWN_COMMIT",
    "write_commit",
    "write_json_atomic",
    "read_commit",
    "validate_commit",
    "writer_identity",
    "writer_alive",
    "stale_threshold",
    "liveness",
]

log = logging.getLogger(__name__)

#: Seconds without a commit before a running run counts as stale, at least (see :func:`stale_threshold`).
DEFAULT_STALE_AFTER = 120.0
#: What a tolerant read returns for a store without a readable commit file.
UNKNOWN_COMMIT: dict[str, Any] = {"snapshots": 0, "last_step": None, "status": "unknown", "heartbeat": None}
_RETRIES = 3


def write_commit(root: Path, payload: dict[str, Any]) -> None:
    """Replace ``root/commit.json`` atomically with ``payload`` (temporary file, fsync, rename).

    Raises:
        OSError: the file cannot be written (disk full, read-only store).
    """
    write_json_atomic(Path(root) / schema.COMMIT_FILE, payload)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Replace the JSON file at ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def validate_commit(commit: Any, where: Path | str) -> dict[str, Any]:
    """Check the types and ranges of a commit record; return it.

    Raises:
        StoreDamagedError: naming the file and the first bad field.
    """

    def bad(what: str) -> schema.StoreDamagedError:
        return schema.StoreDamagedError(f"{where} is damaged: {what}; the store cannot be read as it is")

    if not isinstance(commit, dict):
        raise bad(f"it holds a JSON {type(commit).__name__}, not an object")
    snapshots = commit.get("snapshots", 0)
    if not _is_int(snapshots) or snapshots < 0:
        raise bad(f"'snapshots' is {snapshots!r}, not a count >= 0")
    last = commit.get("last_step")
    if last is not None and not _is_int(last):
        raise bad(f"'last_step' is {last!r}, not a step number")
    if snapshots and last is None:
        raise bad(f"'last_step' is missing for {snapshots} snapshot(s)")
    status = commit.get("status", "unknown")
    if not isinstance(status, str):
        raise bad(f"'status' is {status!r}, not a string")
    for key in ("heartbeat", "heartbeat_interval"):
        value = commit.get(key)
        if value is not None and not _is_number(value):
            raise bad(f"'{key}' is {value!r}, not a number")
    for key, minimum in (("generation", 0), ("key_interval", 1)):
        value = commit.get(key)
        if value is not None and (not _is_int(value) or value < minimum):
            raise bad(f"'{key}' is {value!r}, not an integer >= {minimum}")
    gaps = commit.get("gaps", [])
    if not isinstance(gaps, list) or not all(isinstance(g, list) and len(g) == 3 and all(_is_int(x) for x in g) for g in gaps):
        raise bad("'gaps' is not a list of [first_step, last_step, count]")
    history = commit.get("history", [])
    if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
        raise bad("'history' is not a list of events")
    writer = commit.get("writer")
    if writer is not None and not isinstance(writer, dict):
        raise bad(f"'writer' is {writer!r}, not an object")
    return commit


def read_commit(root: Path | str, *, tolerant: bool = False) -> dict[str, Any]:
    """The commit record of the store at ``root``, validated.

    A missing file reads as :data:`UNKNOWN_COMMIT` (a store being created, or
    not a store). A file that is not valid JSON is retried a few times (only
    a writer outside this package could leave it half-written), then an error.

    Args:
        tolerant: return :data:`UNKNOWN_COMMIT` instead of raising (a status poll
            that must not fail; a full read reports the damage).

    Raises:
        StoreDamagedError: invalid JSON, a wrong JSON type, an unreadable file, a symlink loop.
    """
    path = Path(root) / schema.COMMIT_FILE
    try:
        for attempt in range(_RETRIES):
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except FileNotFoundError:
                return dict(UNKNOWN_COMMIT)
            except (OSError, UnicodeDecodeError) as exc:
                raise schema.StoreDamagedError(f"{path} cannot be read ({_os_reason(exc)})") from exc
            try:
                return validate_commit(json.loads(text), path)
            except json.JSONDecodeError as exc:
                if attempt == _RETRIES - 1:
                    raise schema.StoreDamagedError(f"{path} is damaged: not valid JSON ({exc.msg} at byte {exc.pos})") from exc
                time.sleep(0.01)
    except schema.StoreDamagedError:
        if tolerant:
            return dict(UNKNOWN_COMMIT)
        raise
    raise AssertionError("unreachable")


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
        return int(text[text.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def writer_identity() -> dict[str, Any]:
    """This process as a writer: ``{"pid", "host", "start"}`` (start: process start ticks, to tell a reused pid)."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": _start_ticks(pid)}


def writer_alive(commit: dict[str, Any], *, any_status: bool = False) -> bool | None:
    """Whether the writer a commit (or lock) record names still runs: None if it cannot be told
    from here (another host, no pid recorded, or the run is not ``running`` unless ``any_status``)."""
    writer = commit.get("writer") if "writer" in commit else commit
    if not isinstance(writer, dict):
        return None
    if not any_status and commit.get("status") != "running":
        return None
    pid, host = writer.get("pid"), writer.get("host")
    if host != socket.gethostname() or not _is_int(pid) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return None
    start = writer.get("start")
    if _is_int(start):
        now = _start_ticks(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def stale_threshold(times: np.ndarray | None, minimum: float = DEFAULT_STALE_AFTER, commit: dict[str, Any] | None = None) -> float:
    """Seconds without a commit after which a ``running`` run is stale.

    Three heartbeat intervals if the commit records one (the writer heartbeats
    while idle), else three times the median of the last 20 snapshot intervals
    in ``times`` (Unix seconds; a synchronous writer commits only at snapshots);
    never less than ``minimum``.
    """
    interval = (commit or {}).get("heartbeat_interval")
    if interval:
        return max(float(minimum), 3.0 * float(interval))
    if times is not None and len(times) >= 3:
        gaps = np.diff(np.asarray(times, dtype=np.float64)[-20:])
        gaps = gaps[np.isfinite(gaps)]
        if len(gaps):
            return max(float(minimum), 3.0 * float(np.median(gaps)))
    return float(minimum)


def liveness(
    commit: dict[str, Any],
    *,
    now: float | None = None,
    times: np.ndarray | None = None,
    minimum: float = DEFAULT_STALE_AFTER,
    stale_after: float | None = None,
    alive: bool | None = None,
) -> str:
    """``live``, ``stale`` or ``crashed`` for a running run (module docstring); else ``finished``,
    ``disabled`` or ``unknown``.

    Args:
        times: snapshot times, for the threshold of a writer without idle heartbeats.
        stale_after: the threshold itself, if the caller computed it (:func:`stale_threshold`).
        alive: the writer's liveness if already known (:func:`writer_alive` otherwise).
    """
    status = commit.get("status")
    if status != "running":
        return status if status in ("finished", "disabled") else "unknown"
    if alive is None:
        alive = writer_alive(commit)
    if alive is False:
        return "crashed"
    beat = commit.get("heartbeat")
    limit = stale_threshold(times, minimum, commit) if stale_after is None else stale_after
    now = time.time() if now is None else now
    if beat is not None and now - float(beat) > limit:
        return "stale"
    return "live"
