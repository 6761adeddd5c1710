"""Plain-text summary of a run: the table ``compass-monitor summary`` prints."""

from __future__ import annotations

import textwrap
import time

import numpy as np

from .aggregates import by_module_type, everything_linear, group_stats
from .store import Run

__all__ = ["WIDTH", "status_text", "summary_text"]

_TYPE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other", "embedding", "lm_head", "norm", "bias")
_MASK_LABELS = (("principal", "princ"), ("low", "low"), ("principal_not_low", "p¬low"))


def _fmt(x: float, width: int = 6, digits: int = 3) -> str:
    return f"{'-':>{width}}" if not np.isfinite(x) else f"{x:>{width}.{digits}f}"


def _select_rows(num: int, max_rows: int) -> list[int]:
    if num <= max_rows:
        return list(range(num))
    # Evenly spaced, always ending on the latest snapshot.
    return sorted(set(np.linspace(0, num - 1, max_rows).round().astype(int).tolist()))


#: the widest line summary_text prints (a terminal of 80 columns shows it without wrapping)
WIDTH = 80


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False) or [""]


def status_text(run: Run, *, now: float | None = None) -> str:
    """The run's state in words, from the store's one definition (:attr:`Run.liveness`, which ``inspect`` and the TUI use).

    ``finished``, ``disabled``, ``running`` (its writer is alive), ``stale`` (running, but no commit for
    longer than the store's staleness threshold) or ``crashed`` (running, but its writer process is gone),
    with the age of the last write.
    """
    now = time.time() if now is None else now
    heartbeat = run.commit.get("heartbeat")
    age = f", last write {max(0.0, now - heartbeat):.0f}s ago" if heartbeat else ""
    state = run.liveness
    if state == "crashed":
        return f"stale: running, but its writer process is gone{age}"
    if state == "stale":
        return f"stale: running, but its writer is silent{age}"
    return f"{run.status}{age}"


def _type_blocks(ordered: list[str], fixed: int, per_type: int) -> list[list[str]]:
    """Module types in blocks narrow enough that a row of ``fixed + per_type * len(block)`` fits in WIDTH."""
    size = max(1, (WIDTH - fixed) // per_type)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)] or [[]]


def summary_text(run: Run, *, max_rows: int = 20) -> str:
    """A readable table, at most 80 columns wide: step, global sparsity, sparsity per module type, overlaps vs baselines."""
    lines = []
    run_info = run.attrs.get("run", {})
    numel = sum(p.numel for p in run.params)
    alpha = run.config.get("alpha", float("nan"))
    lines += _wrap(
        f"run {run_info.get('name', run.path.name)!r} [{status_text(run)}]: {len(run.params)} matrices, "
        f"{numel / 1e6:.2f}M weights, {run.num_snapshots} snapshots, every {run.config.get('every_n_steps', '?')} steps",
        "  ",
    )
    gaps = getattr(run, "gaps", [])
    if gaps:
        lines += _wrap(
            f"gaps: {sum(g[2] for g in gaps)} snapshot(s) skipped because the store writer was behind, at steps "
            + ", ".join(f"{a}" + (f"..{b}" if b != a else "") for a, b, _ in gaps[:8])
            + (", ..." if len(gaps) > 8 else ""),
            "  ",
        )
    unmonitored = getattr(run, "resume_gaps", [])
    if unmonitored:
        lines += _wrap(
            "not monitored (resumed past the last step the store saw): "
            + "; ".join(f"after step {a}, resumed at step {b}" for a, b in unmonitored[:8])
            + ("; ..." if len(unmonitored) > 8 else "")
            + "; the next snapshot's step-to-step flips span the gap",
            "  ",
        )
    dropped = [e for e in getattr(run, "history", []) if e.get("event") == "resumed" and e.get("dropped")]
    if dropped:
        lines += _wrap("resumed: " + "; ".join(f"at step {e.get('step')}, {e.get('dropped')} later snapshot(s) dropped" for e in dropped), "  ")
    if run.num_snapshots == 0:
        lines.append("no committed snapshots yet")
        return "\n".join(lines)

    overall = group_stats(run, everything_linear).get("all linear")
    types = group_stats(run, by_module_type)
    ordered = [t for t in _TYPE_ORDER if t in types] + sorted(t for t in types if t not in _TYPE_ORDER)
    rows = _select_rows(run.num_snapshots, max_rows)

    lines.append("")
    lines += _wrap("update sparsity 1 - |M|/n (Def. 2.2) of all linear matrices and per module type")
    for block in _type_blocks(ordered, 14, 7):
        lines.append(f"{'step':>7} {'all':>6} " + " ".join(f"{t[:6]:>6}" for t in block))
        for t in rows:
            row = f"{int(run.steps[t]):>7} {_fmt(overall.sparsity[t]) if overall else _fmt(np.nan)} "
            lines.append(row + " ".join(_fmt(types[name].sparsity[t]) for name in block))

    lines.append("")
    lines += _wrap(
        f"overlap |X∩M|/|M| of all linear matrices with X = principal (k={run.config.get('principal_rank')}), "
        f"low, principal-not-low; 'rand' = random baseline (density of X; alpha={alpha}), "
        "'null' = precision null (geometry-blind noise, same |M|)"
    )
    lines.append(f"{'step':>7}" + "".join(f" | {label:>6} {'rand':>5} {'null':>5}" for _, label in _MASK_LABELS))
    for t in rows:
        row = f"{int(run.steps[t]):>7}"
        for mask, _ in _MASK_LABELS:
            if overall is None:
                row += f" | {_fmt(np.nan)} {_fmt(np.nan, 5, 2)} {_fmt(np.nan, 5, 3)}"
            else:
                row += f" | {_fmt(overall.overlap[mask][t])} {_fmt(overall.random_baseline[mask][t], 5, 2)} {_fmt(overall.null[mask][t], 5, 3)}"
        lines.append(row)

    last = run.num_snapshots - 1
    lines.append("")
    lines.append(f"at step {int(run.steps[last])}, per module type (overlap and its precision null):")
    lines.append(f"{'type':>7} {'mats':>5} {'weights':>10} {'sparsity':>9}" + "".join(f"|{label:>6} {'null':>6}" for _, label in _MASK_LABELS))
    for name in ordered:
        s = types[name]
        row = f"{name[:7]:>7} {s.num_matrices:>5} {s.numel:>10} {_fmt(s.sparsity[last], 9, 4)}"
        row += "".join(f"|{_fmt(s.overlap[m][last])} {_fmt(s.null[m][last])}" for m, _ in _MASK_LABELS)
        lines.append(row)
    lines += _spectral_lines(run, ordered)
    return "\n".join(lines)


def _spectral_lines(run: Run, ordered: list[str]) -> list[str]:
    """Spectral drift per module type at the latest snapshot that has it (Sec. 4.1)."""
    values = run.spectral_metrics
    if values is None or not np.isfinite(values).any():
        return []
    t = int(np.nonzero(np.isfinite(values).any(axis=(1, 2)))[0][-1])
    k = run.config.get("spectral_k", "?")
    lines = [""]
    lines += _wrap(f"spectral drift at step {int(run.steps[t])} (Sec. 4.1; k={k}): mean and max NSS, largest principal angle (deg), top-k energy change")
    lines.append(f"{'type':>10} {'NSS mean':>10} {'NSS max':>10} {'angle U':>8} {'angle V':>8} {'energy':>10}")
    for name in ordered:
        idx = [p.index for p in run.params if (p.module_type if p.role == "linear" else p.role) == name]
        v = values[t, idx]
        if not np.isfinite(v[:, 0]).any():
            continue
        lines.append(
            f"{name:>10} {np.nanmean(v[:, 0]):>10.2e} {np.nanmax(v[:, 0]):>10.2e} {np.nanmax(v[:, 1]):>8.3f} "
            f"{np.nanmax(v[:, 2]):>8.3f} {np.nanmean(v[:, 3]):>10.2e}"
        )
    return lines
