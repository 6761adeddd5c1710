"""``compass-monitor inspect``: what a run store holds, how big it is, and whether its writer lives."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import schema
from .integrity import verify_run
from .lock import lock_owner
from .reader import Run, open_run

__all__ = ["inspect_text", "store_sizes", "GroupSize"]

# Display groups, in order: (label, path prefixes inside the store).
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("masks (frames)", (schema.CHANGED_PREFIX,)),
    ("mask frame index", (schema.FRAMES,)),
    ("previews", (schema.PREVIEW_PREFIX,)),
    ("profiles/rows", (schema.ROWS_PREFIX,)),
    ("profiles/cols", (schema.COLS_PREFIX,)),
    ("metrics + steps", ("metrics", "snapshots")),
    ("reference masks", (schema.REFERENCE_PREFIX,)),
    ("base W0 codes", (schema.BASE_WEIGHTS_PREFIX,)),
    ("base stats", (schema.BASE_FINGERPRINT, schema.BASE_CLASS_COUNTS)),
)


@dataclass
class GroupSize:
    """Bytes of one group of arrays: on disk, and as plain uncompressed arrays (``logical``)."""

    label: str
    files: int = 0
    stored: int = 0
    logical: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.logical / self.stored if self.stored else float("nan")


def _logical_sizes(run: Run) -> dict[str, int]:
    t, p = run.num_snapshots, len(run.params)
    nbytes = sum((q.numel + 7) // 8 for q in run.params)
    preview = 0
    for q in run.params:
        bh, bw = min(schema.PREVIEW_MAX_BLOCKS, q.shape[0]), min(schema.PREVIEW_MAX_BLOCKS, q.shape[1])
        preview += bh * bw
    return {
        "masks (frames)": t * nbytes,
        "mask frame index": t * p * len(schema.FRAME_FIELDS) * 8,
        "previews": t * preview * 4,
        "profiles/rows": t * sum(q.shape[0] for q in run.params) * 4,
        "profiles/cols": t * sum(q.shape[1] for q in run.params) * 4,
        "metrics + steps": t * p * (len(schema.COUNT_FIELDS) + len(schema.REFERENCE_MASKS)) * 8 + t * 16,
        "reference masks": len(schema.REFERENCE_MASKS) * nbytes,
        "base W0 codes": sum(q.numel for q in run.params) * 2 if run.commit.get("base_weights") else 0,
        "base stats": p * 2 * 8 + p * 4 * 512 * 8,
    }


def store_sizes(run: Run) -> tuple[list[GroupSize], GroupSize, int]:
    """Per display group sizes, the metadata files' size, and the count of leftover temporary files."""
    groups = {label: GroupSize(label) for label, _ in _GROUPS}
    meta = GroupSize("metadata (json)")
    leftovers = 0
    root = run.path
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            try:
                size = full.stat().st_size
            except FileNotFoundError:  # replaced while we walked
                continue
            if name.endswith(".partial") or name.endswith(".tmp"):
                leftovers += 1
                continue
            if name.endswith(".json"):
                meta.files += 1
                meta.stored += size
                continue
            for label, prefixes in _GROUPS:
                if any(rel == pre or rel.startswith(pre + "/") for pre in prefixes):
                    groups[label].files += 1
                    groups[label].stored += size
                    break
    for label, logical in _logical_sizes(run).items():
        groups[label].logical = logical
    return [groups[label] for label, _ in _GROUPS], meta, leftovers


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _when(ts: Any) -> str:
    if not ts:
        return "?"
    return _dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def _history_line(event: dict[str, Any]) -> str:
    kind = event.get("event", "?")
    text = f"{_when(event.get('time'))} {kind}"
    if kind == "resumed":
        text += f" at step {event.get('step')}: kept {event.get('kept')} snapshot(s), dropped {event.get('dropped')}"
    elif kind == "disabled" and event.get("reason"):
        text += f" at step {event.get('step')}: {event.get('reason')}"
    elif kind in ("finished",) and "snapshots" in event:
        text += f" with {event['snapshots']} snapshot(s)"
    if event.get("pid"):
        text += f" (pid {event['pid']})"
    return text


def _selection_lines(facts: dict[str, Any]) -> list[str]:
    """What the selection left out and why (the store attribute ``selection``, written by the monitor)."""
    out = []
    frozen = facts.get("frozen") or []
    if frozen:
        kept = " (monitored: include_frozen)" if facts.get("frozen_included") else " (not monitored)"
        shown = ", ".join(f"{e.get('name')}: {e.get('reason')}" for e in frozen[:4]) + (", ..." if len(frozen) > 4 else "")
        out.append(f"  frozen: {len(frozen)} matrices{kept}: {shown}")
    unknown = facts.get("unknown_module_types") or []
    if unknown:
        out.append(f"  typed 'other' (no known module type): {', '.join(unknown[:4])}" + (", ..." if len(unknown) > 4 else ""))
    for note in facts.get("notes") or []:
        out.append(f"  note: {note}")
    return out


def inspect_text(path: str | os.PathLike[str], *, verify: bool = True) -> str:
    """A readable report of the store at ``path``.

    Args:
        verify: decode every committed snapshot and check it (``integrity.verify_run``) first.

    Raises:
        StoreDamagedError: the store is damaged (the first problem, and how many were found).
    """
    run = open_run(path)
    checked = ""
    if verify:
        problems = verify_run(run)
        if problems:
            more = f" ({len(problems)} problems found{', at least' if len(problems) >= 20 else ''}; the first is shown)" if len(problems) > 1 else ""
            raise schema.StoreDamagedError(problems[0] + more)
        checked = f"sound: {run.num_snapshots} snapshot(s) x {len(run.params)} matrices decoded and checked against their counts"
        run = open_run(path)  # fresh caches for the report
    commit = run.commit
    lines = []
    info = run.attrs.get("run", {})
    lines.append(f"run {info.get('name', run.path.name)!r} at {run.path}")
    lines.append(
        f"  schema {run.schema_version} ({schema.FORMAT_NAME}, Zarr v3; every array bytes + zstd; "
        f"masks as key frames every {run.key_interval} snapshot(s) + XOR deltas, packed bits or Rice-coded positions)"
    )
    age = run.heartbeat_age
    beat = "never" if age is None else f"{age:.0f} s ago"
    writer = commit.get("writer") or {}
    alive = run.writer_alive
    who = ""
    if writer and run.status == "running":
        state = {True: "alive", False: "gone", None: "not checkable from here"}[alive]
        who = f", writer pid {writer.get('pid')} on {writer.get('host')}: {state}"
    status = run.status
    if run.is_stale:
        status += " (STALE: the writer is gone; the run is unfinished and readable up to its last commit)"
    interval = commit.get("heartbeat_interval")
    lines.append(f"  status: {status}; heartbeat {beat}" + (f" (every {interval:.0f} s while idle)" if interval else "") + who)
    t = run.num_snapshots
    if t:
        steps = run.steps
        lines.append(f"  snapshots: {t} committed, steps {int(steps[0])}..{int(steps[-1])}; generation {commit.get('generation', 0)}")
    else:
        lines.append("  snapshots: none committed yet")
    numel = sum(p.numel for p in run.params)
    lines.append(f"  matrices: {len(run.params)} ({numel / 1e6:.2f}M weights); base W0 codes stored: {'yes' if commit.get('base_weights') else 'no'}")
    lines.extend(_selection_lines(run.attrs.get("selection") or {}))
    gaps = run.gaps
    if gaps:
        skipped = sum(g[2] for g in gaps)
        shown = ", ".join(f"{a}" + (f"..{b}" if b != a else "") + f" ({c})" for a, b, c in gaps[:8])
        more = f", ... ({len(gaps) - 8} more ranges)" if len(gaps) > 8 else ""
        lines.append(f"  gaps: {skipped} snapshot(s) skipped (writer queue full) at steps {shown}{more}")
    else:
        lines.append("  gaps: none")
    truncations = [e for e in run.history if e.get("event") == "resumed" and e.get("dropped")]
    if truncations:
        lines.append("  truncations: " + "; ".join(f"resumed at step {e.get('step')} dropped {e.get('dropped')} snapshot(s)" for e in truncations))
    else:
        lines.append("  truncations: none")
    unmonitored = run.resume_gaps
    if unmonitored:
        shown = "; ".join(f"steps {a + 1}..{b} (resumed at {b} after step {a})" for a, b in unmonitored[:8])
        more = f"; ... ({len(unmonitored) - 8} more)" if len(unmonitored) > 8 else ""
        lines.append(f"  not monitored: {shown}{more}")
    else:
        lines.append("  not monitored: none")
    if run.history:
        lines.append("  history:")
        lines.extend(f"    {_history_line(e)}" for e in run.history[-12:])

    groups, meta, leftovers = store_sizes(run)
    lines.append("")
    lines.append(f"  {'arrays':<18} {'files':>7} {'on disk':>10} {'plain':>10} {'ratio':>7}")
    total_stored = total_logical = 0
    for g in groups:
        if not g.files and not g.logical:
            continue
        ratio = f"{g.ratio:.1f}x" if g.stored else "-"
        lines.append(f"  {g.label:<18} {g.files:>7} {_human(g.stored):>10} {_human(g.logical):>10} {ratio:>7}")
        total_stored += g.stored
        total_logical += g.logical
    lines.append(f"  {meta.label:<18} {meta.files:>7} {_human(meta.stored):>10}")
    total_stored += meta.stored
    lines.append(f"  {'total':<18} {'':>7} {_human(total_stored):>10} {_human(total_logical):>10}")
    lines.append("  ('plain' = the same arrays uncompressed; for masks, bit-packed: 1 bit per weight per snapshot)")
    if t:
        masks = groups[0].stored
        per_snapshot = sum(g.stored for g in groups[:6])
        lines.append(
            f"  per snapshot: masks {_human(masks / t)} ({8 * masks / t / max(numel, 1):.3f} bits/weight), "
            f"with previews, profiles and metrics {_human(per_snapshot / t)}"
        )
    lines.append(f"  integrity: {checked or 'not verified (--no-verify)'}")
    owner = lock_owner(run.path)
    if owner:
        lines.append(f"  writer lock: last taken by pid {owner.get('pid')} on {owner.get('host')} ({owner.get('purpose', '?')})")
    if leftovers:
        lines.append(f"  {leftovers} temporary file(s) left by interrupted writes (harmless; never read)")
    return "\n".join(lines)
