"""Seeded synthetic run stores for the TUI's tests, snapshot tests, tmux check and benchmark (test scaffolding, not shipped).

No training: masks with a plausible structure (head-aligned row stripes in
q/k/v, column stripes in o, density growing over time) are drawn from a seeded
generator and written through the real :class:`RunWriter`, so the files are a
valid schema-1 store. Two modes:

* :func:`write_synthetic_run` writes every snapshot with ``RunWriter.append``
  (real masks, profiles and counts that agree with each other);
* :func:`write_bulk_run` writes the per-snapshot metrics of a large run
  (hundreds of matrices, a thousand snapshots) in bulk, and masks (as packed
  key frames), previews and profiles only for the first ``detail_params``
  matrices; it exists so that a benchmark can build a 200 x 1000 run in seconds.

Imports neither torch nor Textual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from compass_monitor.store import ParamInfo, codec, schema
from compass_monitor.store.writer import RunWriter, SnapshotRecord

__all__ = ["SyntheticSpec", "synthetic_params", "write_synthetic_run", "write_bulk_run"]

_ATTN = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")
_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    """Shape of a synthetic model: ``layers`` blocks of q, k, v, o, gate, up, down."""

    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    head_dim: int = 16
    every_n_steps: int = 10
    alpha: float = 0.5
    principal_rank: int = 8


def synthetic_params(spec: SyntheticSpec, *, limit: int | None = None, geometry: dict[str, dict] | None = None) -> list[ParamInfo]:
    """Parameter specs in the order a Llama-style model names them; ``geometry`` adds facts per module type
    (e.g. ``{"k": {"heads": 2}}``) to the records the store keeps."""
    geometry = geometry or {}
    h, f = spec.hidden, spec.intermediate
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (f, h), "up": (f, h), "down": (h, f)}
    params = []
    for layer in range(spec.layers):
        for kind in _ATTN + _MLP:
            name = f"model.layers.{layer}.{_NAMES[kind]}.weight"
            params.append(ParamInfo(name=name, role="linear", module_type=kind, layer=layer, shape=shapes[kind], index=len(params),
                                    extra=dict(geometry.get(kind, {}))))
    return params[:limit] if limit is not None else params


def _attributes(spec: SyntheticSpec, name: str, seed: int) -> dict:
    return {
        "run": {"name": name, "created": 1_700_000_000.0, "model_class": "Synthetic", "host": "synthetic", "pid": 0},
        "config": {"every_n_steps": spec.every_n_steps, "principal_rank": spec.principal_rank, "alpha": spec.alpha},
        "methods": {"changed": "synthetic (seeded random masks, no training)"},
        "count_fields": list(schema.COUNT_FIELDS),
        "reference_masks": list(schema.REFERENCE_MASKS),
        "versions": {},
        "metadata": {"source": "tests/synthetic_runs.py", "seed": seed, "head_dim": spec.head_dim},
    }


class _MaskModel:
    """Per-matrix changed masks that grow over time, with head-aligned stripes."""

    def __init__(self, p: ParamInfo, spec: SyntheticSpec, rng: np.random.Generator, speed: float) -> None:
        m, n = p.shape
        hd = spec.head_dim
        rows = 0.4 + rng.random(m)
        cols = 0.4 + rng.random(n)
        if p.module_type in ("q", "k", "v"):  # row stripes, strongest in some heads
            heads = 0.3 + 1.4 * rng.random((m + hd - 1) // hd)
            rows = rows * np.repeat(heads, hd)[:m]
        elif p.module_type == "o":  # column stripes
            heads = 0.3 + 1.4 * rng.random((n + hd - 1) // hd)
            cols = cols * np.repeat(heads, hd)[:n]
        self.weight = np.outer(rows / rows.mean(), cols / cols.mean())
        self.u = rng.random((m, n))
        self.speed = speed
        k = int(spec.alpha * m * n)
        magnitude = rng.random(m * n)
        principal = np.zeros(m * n, dtype=bool)
        principal[np.argsort(-(magnitude + 0.5 * rng.random(m * n)))[:k]] = True
        low = np.zeros(m * n, dtype=bool)
        low[np.argsort(magnitude)[:k]] = True
        # Small weights flip first: bias the flip threshold by magnitude rank.
        self.u = self.u * (0.6 + 0.8 * magnitude.reshape(m, n))
        self.reference = [principal.reshape(m, n), low.reshape(m, n), (principal & ~low).reshape(m, n)]
        self.previous = np.zeros((m, n), dtype=bool)

    def mask(self, t: int, rng: np.random.Generator) -> np.ndarray:
        level = 1.0 - np.exp(-self.speed * (t + 1))
        mask = self.u < np.clip(level * self.weight * 0.8, 0, 1)
        flips = rng.random(mask.shape) < 0.002
        return mask ^ flips


def _record(models: list[_MaskModel], t: int, step: int, wall: float, rng: np.random.Generator, alpha: float) -> SnapshotRecord:
    counts, nulls, rows, cols, packed = [], [], [], [], []
    for model in models:
        mask = model.mask(t, rng)
        changed = int(mask.sum())
        inter = [int((mask & ref).sum()) for ref in model.reference]
        flips = int((mask ^ model.previous).sum())
        model.previous = mask
        counts.append([changed, *inter, flips, 0])
        if changed:
            nulls.append([alpha - 0.02, alpha + 0.03, 0.2])
        else:
            nulls.append([np.nan] * 3)
        rows.append(mask.sum(axis=1).astype(np.int32))
        cols.append(mask.sum(axis=0).astype(np.int32))
        packed.append(np.packbits(mask.ravel()))
    return SnapshotRecord(
        step=step,
        wall_time=wall,
        counts=np.asarray(counts, dtype=np.int64),
        null_overlap=np.asarray(nulls, dtype=np.float64),
        rows=rows,
        cols=cols,
        packed=packed,
    )


def _base(writer: RunWriter, models: list[_MaskModel]) -> None:
    class_counts = np.zeros((len(models), 4, 512), dtype=np.int64)
    for i, model in enumerate(models):
        class_counts[i, 0, 250] = model.u.size
        for j, ref in enumerate(model.reference):
            class_counts[i, j + 1, 250] = int(ref.sum())
    writer.write_base(
        fingerprints=np.zeros((len(models), 2), dtype=np.int64),
        class_counts=class_counts,
        reference_packed=[np.stack([np.packbits(r.ravel()) for r in model.reference]) for model in models],
    )


class SyntheticWriter:
    """Appends seeded synthetic snapshots to a new run store, one call at a time."""

    def __init__(self, path: str | Path, *, spec: SyntheticSpec | None = None, seed: int = 0, name: str | None = None,
                 geometry: dict[str, dict] | None = None, writer_options: dict | None = None) -> None:
        self.spec = spec or SyntheticSpec()
        self.rng = np.random.default_rng(seed)
        params = synthetic_params(self.spec, geometry=geometry)
        speeds = 0.02 + 0.25 * self.rng.random(len(params))
        self.models = [_MaskModel(p, self.spec, self.rng, float(s)) for p, s in zip(params, speeds)]
        self.writer = RunWriter.create(Path(path), params=params, attributes=_attributes(self.spec, name or Path(path).name, seed),
                                       **(writer_options or {}))
        _base(self.writer, self.models)
        self.t = 0

    def append(self, *, wall_time: float | None = None) -> None:
        step = (self.t + 1) * self.spec.every_n_steps
        wall = 1_700_000_000.0 + 60.0 * self.t if wall_time is None else wall_time
        self.writer.append(_record(self.models, self.t, step, wall, self.rng, self.spec.alpha))
        self.t += 1

    def finish(self, status: str = "finished") -> None:
        self.writer.finalize(status)


def write_synthetic_run(
    path: str | Path, *, snapshots: int = 8, spec: SyntheticSpec | None = None, seed: int = 0, status: str = "finished"
) -> Path:
    """A complete, self-consistent synthetic run (every array written). ``status`` ``running`` leaves it open."""
    writer = SyntheticWriter(path, spec=spec, seed=seed)
    for _ in range(snapshots):
        writer.append()
    if status == "running":
        writer.writer.mark("running")
    else:
        writer.finish(status)
    return Path(path)


def write_bulk_run(
    path: str | Path,
    *,
    matrices: int = 200,
    snapshots: int = 1000,
    spec: SyntheticSpec | None = None,
    detail_params: int = 2,
    seed: int = 0,
) -> Path:
    """A large finished run whose metrics are written in bulk (fast); masks only for ``detail_params`` matrices."""
    spec = spec or SyntheticSpec(layers=(matrices + 6) // 7)
    rng = np.random.default_rng(seed)
    params = synthetic_params(spec, limit=matrices)
    root = Path(path)
    writer = RunWriter.create(root, params=params, attributes=_attributes(spec, root.name, seed))
    detail = [_MaskModel(p, spec, rng, 0.01) for p in params[:detail_params]]
    sizes = np.array([p.numel for p in params], dtype=np.int64)
    class_counts = np.zeros((len(params), 4, 512), dtype=np.int64)
    class_counts[:, 0, 250] = sizes
    class_counts[:, 1:3, 250] = (spec.alpha * sizes).astype(np.int64)[:, None]
    class_counts[:, 3, 250] = (0.2 * sizes).astype(np.int64)
    reference = [np.zeros((3, (s + 7) // 8), dtype=np.uint8) for s in sizes]
    for i, model in enumerate(detail):
        reference[i] = np.stack([np.packbits(r.ravel()) for r in model.reference])
    writer.write_base(fingerprints=np.zeros((len(params), 2), dtype=np.int64), class_counts=class_counts, reference_packed=reference)

    t_axis = np.arange(snapshots, dtype=np.float64)[:, None]
    speed = 0.001 + 0.01 * rng.random(len(params))[None, :]
    density = 0.9 * (1.0 - np.exp(-speed * (t_axis + 1)))
    changed = (density * sizes[None, :]).astype(np.int64)
    counts = np.zeros((snapshots, len(params), len(schema.COUNT_FIELDS)), dtype=np.int64)
    counts[:, :, 0] = changed
    counts[:, :, 1] = (changed * (0.45 + 0.05 * rng.random(len(params)))).astype(np.int64)
    counts[:, :, 2] = (changed * (0.55 + 0.05 * rng.random(len(params)))).astype(np.int64)
    counts[:, :, 3] = (changed * 0.15).astype(np.int64)
    counts[:, :, 4] = np.abs(np.diff(changed, axis=0, prepend=0))
    null = np.broadcast_to(np.array([0.47, 0.55, 0.17]), (snapshots, len(params), 3)).copy()

    group = zarr.open_group(store=str(root), mode="r+")
    steps = (np.arange(snapshots, dtype=np.int64) + 1) * spec.every_n_steps
    for name, data in ((schema.STEPS, steps), (schema.TIMES, 1_700_000_000.0 + 60.0 * np.arange(snapshots)),
                       (schema.COUNTS, counts), (schema.NULL_OVERLAP, null)):
        array = group[name]
        array.resize(data.shape)
        array[...] = data
    for i, p in enumerate(params):
        pid = schema.param_id(i)
        for prefix, width in ((schema.CHANGED_PREFIX, (p.numel + 7) // 8), (schema.ROWS_PREFIX, p.shape[0]), (schema.COLS_PREFIX, p.shape[1])):
            group[f"{prefix}/{pid}"].resize((snapshots, width))
    for name in (schema.FRAMES, *(f"{schema.PREVIEW_PREFIX}/{schema.param_id(i)}" for i in range(len(params)))):
        if name in group:  # schema 2: frame headers (zeros = packed key frames) and previews
            array = group[name]
            array.resize((snapshots, *array.shape[1:]))
    for i, model in enumerate(detail):
        pid = schema.param_id(i)
        masks = [model.mask(t, rng) for t in range(snapshots)]
        packed = np.stack([np.packbits(m.ravel()) for m in masks])
        group[f"{schema.CHANGED_PREFIX}/{pid}"][...] = packed
        if f"{schema.PREVIEW_PREFIX}/{pid}" in group:
            edges = codec.preview_edges(*params[i].shape, schema.PREVIEW_MAX_BLOCKS)
            group[f"{schema.PREVIEW_PREFIX}/{pid}"][...] = np.stack([codec.preview_counts(row, params[i].shape, *edges) for row in packed])
        group[f"{schema.ROWS_PREFIX}/{pid}"][...] = np.stack([m.sum(axis=1) for m in masks]).astype(np.int32)
        group[f"{schema.COLS_PREFIX}/{pid}"][...] = np.stack([m.sum(axis=0) for m in masks]).astype(np.int32)
    # Arrays are complete: commit them (the documented commit file, see docs/store-schema.md).
    commit = {"snapshots": snapshots, "last_step": int(steps[-1]), "status": "finished", "heartbeat": 1_700_000_000.0 + 60.0 * snapshots}
    (root / schema.COMMIT_FILE).write_text(json.dumps(commit), encoding="utf-8")
    return root
