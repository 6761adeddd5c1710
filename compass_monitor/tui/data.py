"""What the TUI shows, computed from a run store with numpy only (no Textual).

Everything here is a plain function of arrays read from the store, so it is
tested without a terminal:

* :func:`discover_runs`, :func:`read_status`, :func:`badge`: the run list;
* :class:`RunView`: one run's committed per-snapshot metrics as the heatmap
  needs them (density ``|M|/n`` per matrix and snapshot, Def. 2.2);
* :class:`MatrixFilter`, :func:`row_order`: grouping (by layer, then q, k, v,
  o, gate, up, down), filtering and sorting of the heatmap's rows;
* :func:`block_density`, :func:`matrix_head_dim`, :func:`head_boundaries`: the
  drill-down's density map and profile marks (paper Fig. 2/3);
* :func:`overlap_series`: overlap with principal / low / principal-not-low over
  time beside the random baseline and the precision null (Sec. 4.2);
* :func:`align_runs`, :func:`jaccard`: comparison of two runs (Sec. 2.2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..aggregates import jaccard, ratio
from ..store import ParamInfo
from ..store import commit as commit_protocol
from ..store.schema import COUNT_FIELDS, COUNTS, REFERENCE_MASKS

__all__ = [
    "TYPE_ORDER",
    "MatrixFilter",
    "RunStatus",
    "RunView",
    "align_runs",
    "badge",
    "block_density",
    "discover_runs",
    "head_boundaries",
    "head_dim_for",
    "jaccard",
    "live_status",
    "matrix_head_dim",
    "overlap_series",
    "read_commit",
    "row_label",
    "row_order",
    "stale_threshold",
    "writer_gone",
]

TYPE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other", "embedding", "lm_head", "norm", "bias")
_CHANGED = COUNT_FIELDS.index("changed")
_FLIPS = COUNT_FIELDS.index("flips_since_previous")
_INTERSECTIONS = tuple(COUNT_FIELDS.index(f) for f in ("changed_and_principal", "changed_and_low", "changed_and_principal_not_low"))
HEAD_TYPES = ("q", "k", "v", "qkv", "o")


# -- runs and their status ------------------------------------------------------
def discover_runs(path: Path, *, depth: int = 2) -> list[Path]:
    """Run stores at ``path``: the path itself if it is one, else those below it (``depth`` levels)."""
    if (path / "zarr.json").is_file():
        return [path]
    found: list[Path] = []
    if depth <= 0 or not path.is_dir():
        return found
    try:
        children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for child in children:
        if (child / "zarr.json").is_file():
            found.append(child)
        else:
            found.extend(discover_runs(child, depth=depth - 1))
    return found


def read_commit(path: Path) -> dict[str, Any]:
    """The run's commit file, or an ``unknown`` status if it is missing or damaged (``store.commit``)."""
    return commit_protocol.read_commit(path, tolerant=True)


#: Heartbeat age after which a ``running`` run counts as stale: the store's one definition.
stale_threshold = commit_protocol.stale_threshold


@dataclass(frozen=True)
class RunStatus:
    """One line of the run list."""

    path: Path
    name: str
    status: str  # live, stale, crashed, finished, disabled, unknown, error
    snapshots: int
    last_step: int | None
    heartbeat: float | None
    sparsity: float
    error: str | None = None

    def age(self, now: float) -> float | None:
        return None if self.heartbeat is None else max(0.0, now - self.heartbeat)


def writer_gone(commit: dict[str, Any]) -> bool:
    """True if the commit names a writer process on this host that no longer exists (it crashed or was killed)."""
    return commit_protocol.writer_alive(commit) is False


def live_status(commit_status: str, heartbeat: float | None, now: float, stale_after: float, *, writer_alive: bool = True) -> str:
    """For a running run: ``crashed`` (its writer process is gone), ``stale`` (old heartbeat) or ``live``;
    else the commit's status (``finished``, ``disabled``, ``unknown``). ``store.commit.liveness`` decides."""
    return commit_protocol.liveness(
        {"status": commit_status, "heartbeat": heartbeat}, now=now, stale_after=stale_after, alive=writer_alive
    )


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failure to read a store (no traceback)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def format_age(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def badge(status: str, *, following: bool, heartbeat_age: float | None = None, replay: str | None = None) -> str:
    """The run screen's badge: LIVE, PAUSED, FINISHED, STALE or CRASHED (with heartbeat age), DISABLED, or a replay state."""
    if replay is not None:
        return replay
    if status in ("stale", "crashed"):
        return f"{status.upper()} {format_age(heartbeat_age)}"
    if status == "live":
        return "LIVE" if following else "PAUSED"
    if status in ("finished", "disabled"):
        return status.upper()
    return "UNKNOWN"


# -- one run's per-snapshot metrics ------------------------------------------------
@dataclass(frozen=True)
class RunView:
    """A run's committed metrics, immutable; a refresh makes a new one.

    Attributes:
        params: the monitored parameters in store order.
        steps: (T,) optimizer steps.
        counts: (T, P, F) raw counts.
        null: (T, P, 3) precision-null overlaps, or None until loaded.
        mask_sizes: (P, 3) sizes of the principal / low / principal-not-low masks.
        partial: True while only the latest snapshots' counts are read (the rest are NaN).
    """

    params: tuple[ParamInfo, ...]
    steps: np.ndarray
    times: np.ndarray
    counts: np.ndarray
    null: np.ndarray | None
    mask_sizes: np.ndarray
    numel: np.ndarray = field(repr=False)
    partial: bool = False  # only the latest snapshots are read yet (earlier counts are NaN)

    @classmethod
    def load(cls, run: Any, *, with_null: bool = True, tail: int | None = None) -> "RunView":
        """Read a run's metrics; with ``tail``, only the last ``tail`` snapshots' counts (earlier rows NaN, ``partial``)."""
        numel = np.array([p.numel for p in run.params], dtype=np.float64)
        steps = np.asarray(run.steps)
        t = steps.shape[0]
        partial = tail is not None and t > tail
        if partial:
            counts = np.full((t, len(run.params), len(COUNT_FIELDS)), np.nan)
            counts[t - tail :] = run.read_rows(COUNTS, t - tail, t)  # checked reads (store.chunks)
        else:
            counts = np.asarray(run.counts)
        return cls(
            params=tuple(run.params),
            steps=steps,
            times=np.asarray(run.times),
            counts=counts,
            null=np.asarray(run.null_overlap) if with_null and not partial else None,
            mask_sizes=run.base_class_counts[:, 1:, :].sum(axis=2),
            numel=numel,
            partial=partial,
        )

    def extended(self, *, steps: np.ndarray, times: np.ndarray, counts: np.ndarray, null: np.ndarray | None) -> "RunView":
        """This view with more snapshots appended (rows already read from the store)."""
        return RunView(
            params=self.params,
            steps=np.concatenate([self.steps, steps]),
            times=np.concatenate([self.times, times]),
            counts=np.concatenate([self.counts, counts]),
            null=None if self.null is None else np.concatenate([self.null, null]),
            mask_sizes=self.mask_sizes,
            numel=self.numel,
            partial=self.partial,
        )

    @property
    def num_snapshots(self) -> int:
        return int(self.steps.shape[0])

    @property
    def density(self) -> np.ndarray:
        """(T, P) ``|M| / n``, the changed fraction (1 - update sparsity)."""
        return self.counts[:, :, _CHANGED] / self.numel[None, :]

    @property
    def flip_rate(self) -> np.ndarray:
        """(T, P) ``|M_t xor M_{t-1}| / n``."""
        return self.counts[:, :, _FLIPS] / self.numel[None, :]

    def overlap(self, which: int) -> np.ndarray:
        """(T, P) ``|X ∩ M| / |M|`` for X = principal (0), low (1), principal-not-low (2); NaN where |M| = 0."""
        return ratio(self.counts[:, :, _INTERSECTIONS[which]], self.counts[:, :, _CHANGED])

    @property
    def global_sparsity(self) -> np.ndarray:
        """(T,) update sparsity over all linear matrices (Def. 2.2)."""
        linear = np.array([p.role == "linear" for p in self.params])
        if not linear.any():
            linear = np.ones(len(self.params), dtype=bool)
        changed = self.counts[:, linear, _CHANGED].sum(axis=1)
        return 1.0 - changed / self.numel[linear].sum()

    def metric(self, name: str) -> np.ndarray:
        """(T, P) values of a heatmap metric: ``density``, ``flips`` or ``principal``."""
        match name:
            case "density":
                return self.density
            case "flips":
                return self.flip_rate
            case "principal":
                return self.overlap(0)
            case _:
                raise ValueError(f"unknown heatmap metric {name!r}; expected density, flips or principal")


# -- rows: grouping, filtering, sorting -----------------------------------------------
def row_label(p: ParamInfo) -> str:
    """Short label of a heatmap row: ``L3 q``, or the role for matrices outside blocks."""
    kind = p.module_type if p.role == "linear" else p.role
    return f"L{p.layer} {kind}" if p.layer >= 0 else kind


def _type_rank(p: ParamInfo) -> int:
    kind = p.module_type if p.role == "linear" else p.role
    return TYPE_ORDER.index(kind) if kind in TYPE_ORDER else len(TYPE_ORDER)


_RANGE_RE = re.compile(r"^[lL]?(\d+)(?:(?:-|\.\.)(\d+))?$")


@dataclass(frozen=True)
class MatrixFilter:
    """Which heatmap rows to show.

    Parsed from a query such as ``q k 3-5 mlp``: tokens that name a module type
    (q, k, v, o, gate, up, down, ...) select those types; ``3``, ``L3`` or
    ``3-5`` select a layer range; any other token is a regular expression that
    the parameter name must contain (case-insensitive). All parts must hold.
    """

    types: frozenset[str] = frozenset()
    layers: tuple[int, int] | None = None
    patterns: tuple[str, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "MatrixFilter":
        types: set[str] = set()
        layers = None
        patterns = []
        for token in text.split():
            match = _RANGE_RE.match(token)
            if token in TYPE_ORDER:
                types.add(token)
            elif match:
                lo = int(match.group(1))
                hi = int(match.group(2)) if match.group(2) else lo
                layers = (min(lo, hi), max(lo, hi))
            else:
                try:
                    re.compile(token)
                except re.error as exc:
                    raise ValueError(f"bad pattern {token!r}: {exc}") from None
                patterns.append(token)
        return cls(types=frozenset(types), layers=layers, patterns=tuple(patterns), text=text.strip())

    def __call__(self, p: ParamInfo) -> bool:
        kind = p.module_type if p.role == "linear" else p.role
        if self.types and kind not in self.types:
            return False
        if self.layers is not None and not self.layers[0] <= p.layer <= self.layers[1]:
            return False
        return all(re.search(pattern, p.name, re.IGNORECASE) for pattern in self.patterns)

    @property
    def active(self) -> bool:
        return bool(self.types or self.layers is not None or self.patterns)


SORTS = ("layer", "changed", "principal")


def row_order(
    params: Sequence[ParamInfo],
    *,
    flt: MatrixFilter | None = None,
    sort: str = "layer",
    view: RunView | None = None,
    snapshot: int = -1,
) -> list[int]:
    """Store indices of the rows to show, in display order.

    ``layer``: by layer, then q, k, v, o, gate, up, down (the paper's grouping);
    ``changed``: most changed first at ``snapshot``; ``principal``: highest
    overlap with the principal mask first at ``snapshot``.
    """
    keep = [p.index for p in params if flt is None or flt(p)]
    grouped = sorted(keep, key=lambda i: (params[i].layer < 0, params[i].layer, _type_rank(params[i]), params[i].name))
    if sort == "layer" or view is None or view.num_snapshots == 0:
        if sort not in SORTS:
            raise ValueError(f"unknown sort {sort!r}; expected one of {', '.join(SORTS)}")
        return grouped
    values = view.density[snapshot] if sort == "changed" else view.overlap(0)[snapshot]
    values = np.nan_to_num(values, nan=-1.0)
    return sorted(grouped, key=lambda i: -values[i])


# -- drill-down ---------------------------------------------------------------------
def block_density(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean of ``mask`` over a ``rows x cols`` grid of near-equal blocks (fewer if the matrix is smaller)."""
    m, n = mask.shape
    rows, cols = max(1, min(rows, m)), max(1, min(cols, n))
    r_edges = np.linspace(0, m, rows + 1).astype(np.int64)
    c_edges = np.linspace(0, n, cols + 1).astype(np.int64)
    summed = np.add.reduceat(np.add.reduceat(mask.astype(np.float32), r_edges[:-1], axis=0), c_edges[:-1], axis=1)
    sizes = np.outer(np.diff(r_edges), np.diff(c_edges))
    return summed / sizes


def _positive_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def head_dim_for(attrs: dict[str, Any], fallback: int | None = None) -> int | None:
    """The run's attention head size, else ``fallback`` (``--head-dim``; None: draw no head boundaries).

    Looked up in the store's attributes where the monitor records the model's
    geometry (top level, ``model``, ``geometry``), then in the user's metadata
    (top level or ``model_config``): ``head_dim``, or ``hidden_size`` divided by
    ``num_attention_heads``. Boundaries are drawn only where the dimension is
    divisible by the head size (see :func:`head_boundaries`).
    """
    meta = attrs.get("metadata", {}) or {}
    sources = [attrs, attrs.get("model"), attrs.get("geometry"), meta, meta.get("model_config") if isinstance(meta, dict) else None]
    for source in sources:
        if not isinstance(source, dict):
            continue
        head_dim = _positive_int(source.get("head_dim"))
        if head_dim is not None:
            return head_dim
        hidden, heads = _positive_int(source.get("hidden_size")), _positive_int(source.get("num_attention_heads"))
        if hidden is not None and heads is not None and hidden % heads == 0:
            return hidden // heads
    return fallback


def _fact(p: ParamInfo, key: str) -> Any:
    """An optional fact of a store record (``MatrixSpec.get``: its ``extra``), None when not recorded."""
    get = getattr(p, "get", None)
    return get(key) if callable(get) else getattr(p, key, None)


def matrix_head_dim(p: ParamInfo, attrs: dict[str, Any], fallback: int | None = None) -> int | None:
    """Head size of one matrix: its own record first (``head_dim``, or its size over ``heads``, facts the
    store keeps in the record's ``extra``), then the run's.

    Per-matrix values (recorded by the monitor from the model's config) matter for
    grouped-query attention, where q and k/v have different head counts; stores
    written before they were recorded have neither (None) and fall back to
    :func:`head_dim_for`.
    """
    own = _positive_int(_fact(p, "head_dim"))
    if own is not None:
        return own
    heads = _positive_int(_fact(p, "heads"))
    if heads is not None and p.module_type in HEAD_TYPES:
        size = p.shape[1] if p.module_type == "o" else p.shape[0]
        if size % heads == 0:
            return size // heads
    return head_dim_for(attrs, fallback)


def head_boundaries(p: ParamInfo, head_dim: int | None, axis: str) -> list[int]:
    """Positions (row or column indices) where a new attention head starts, or [] where heads do not apply.

    q, k, v (and fused qkv) split heads along their rows (outputs); o along its columns (inputs).
    """
    if head_dim is None or head_dim <= 0 or p.module_type not in HEAD_TYPES or p.role != "linear":
        return []
    size = p.shape[1] if p.module_type == "o" else p.shape[0]
    if (p.module_type == "o") != (axis == "cols") or size % head_dim or size // head_dim < 2:
        return []
    return list(range(head_dim, size, head_dim))


@dataclass(frozen=True)
class OverlapSeries:
    """Overlap of M with one reference mask over time, with its two baselines."""

    name: str
    observed: np.ndarray
    random: np.ndarray
    null: np.ndarray | None


def overlap_series(view: RunView, index: int) -> list[OverlapSeries]:
    """Principal, low and principal-not-low overlap of matrix ``index`` over time (Sec. 4.2)."""
    out = []
    for j, name in enumerate(REFERENCE_MASKS):
        observed = view.overlap(j)[:, index]
        random = np.full_like(observed, view.mask_sizes[index, j] / view.numel[index])
        null = None if view.null is None else view.null[:, index, j]
        out.append(OverlapSeries(name, observed, random, null))
    return out


# -- comparison of two runs ---------------------------------------------------------------
@dataclass(frozen=True)
class Alignment:
    """Matrices (by name) and snapshots (by step) that two runs share."""

    rows_a: list[int]
    rows_b: list[int]
    snaps_a: np.ndarray
    snaps_b: np.ndarray
    steps: np.ndarray
    by_step: bool


def align_runs(a: RunView, b: RunView) -> Alignment:
    """Pair matrices by name and snapshots by optimizer step (by index if the runs share no step)."""
    names_b = {p.name: p.index for p in b.params}
    pairs = [(p.index, names_b[p.name]) for p in a.params if p.name in names_b]
    common, ia, ib = np.intersect1d(a.steps, b.steps, return_indices=True)
    by_step = len(common) > 0
    if not by_step:
        t = min(a.num_snapshots, b.num_snapshots)
        ia = ib = np.arange(t)
        common = a.steps[:t]
    return Alignment([i for i, _ in pairs], [j for _, j in pairs], ia, ib, common, by_step)
