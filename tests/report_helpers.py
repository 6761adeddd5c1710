"""Small run stores with chosen masks, written through the real RunWriter (no training).

The tests of ``compass_monitor.report`` build runs whose masks they know, so that
every plotted or tabulated number can be recomputed independently from the
masks (and from the masks read back out of the store).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compass_monitor.selection import ParamSpec
from compass_monitor.store import RunWriter, SnapshotRecord
from compass_monitor.store.schema import SPECTRAL_FIELDS

_KINDS = (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"), ("o", "self_attn.o_proj"),
          ("up", "mlp.up_proj"), ("down", "mlp.down_proj"))


def tiny_params(layers: int = 2, hidden: int = 32, inter: int = 48) -> list[ParamSpec]:
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    return [
        ParamSpec(name=f"model.layers.{layer}.{name}.weight", role="linear", module_type=kind, layer=layer, shape=shapes[kind])
        for layer in range(layers)
        for kind, name in _KINDS
    ]


@dataclass
class MaskRun:
    """What a test wrote: masks[t][p] (m, n) bool, reference[p] = (principal, low, principal_not_low)."""

    path: Path
    params: list[ParamSpec]
    steps: list[int]
    masks: list[list[np.ndarray]]
    reference: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def reference_masks(params: list[ParamSpec], seed: int = 0, alpha: float = 0.5) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for p in params:
        m, n = p.shape
        magnitude = rng.random(m * n)
        k = int(alpha * m * n)
        principal = np.zeros(m * n, dtype=bool)
        principal[np.argsort(-(magnitude + 0.5 * rng.random(m * n)))[:k]] = True
        low = np.zeros(m * n, dtype=bool)
        low[np.argsort(magnitude)[:k]] = True
        out.append((principal.reshape(m, n), low.reshape(m, n), (principal & ~low).reshape(m, n)))
    return out


def write_mask_run(
    path: Path,
    params: list[ParamSpec],
    steps: list[int],
    masks: list[list[np.ndarray]],
    *,
    reference: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    fingerprints: np.ndarray | None = None,
    spectral: list[np.ndarray | None] | None = None,
    metadata: dict | None = None,
    key_interval: int = 3,
) -> MaskRun:
    """A finished run store whose snapshot t has changed masks ``masks[t]`` (one per param)."""
    reference = reference if reference is not None else reference_masks(params)
    attributes = {
        "run": {"name": Path(path).name, "created": 1_700_000_000.0, "model_class": "Tiny", "host": "test", "pid": 0},
        "config": {"every_n_steps": steps[1] - steps[0] if len(steps) > 1 else 1, "principal_rank": 4, "alpha": 0.5, "spectral_k": 4},
        "metadata": metadata if metadata is not None else {"head_dim": 8},
    }
    writer = RunWriter.create(path, params=params, attributes=attributes, key_interval=key_interval)
    class_counts = np.zeros((len(params), 4, 512), dtype=np.int64)
    for i, (p, ref) in enumerate(zip(params, reference)):
        class_counts[i, 0, 100] = p.shape[0] * p.shape[1]
        for j, r in enumerate(ref):
            class_counts[i, j + 1, 100] = int(r.sum())
    writer.write_base(
        fingerprints=np.zeros((len(params), 2), dtype=np.int64) if fingerprints is None else fingerprints,
        class_counts=class_counts,
        reference_packed=[np.stack([np.packbits(r.ravel()) for r in ref]) for ref in reference],
    )
    previous = [np.zeros(p.shape, dtype=bool) for p in params]
    for t, (step, snapshot) in enumerate(zip(steps, masks)):
        counts, nulls = [], []
        for i, mask in enumerate(snapshot):
            changed = int(mask.sum())
            counts.append([changed, *(int((mask & r).sum()) for r in reference[i]), int((mask ^ previous[i]).sum()), 0])
            # A stand-in precision null that differs per matrix (its weighting is what the tests check).
            nulls.append([0.4 + 0.01 * i, 0.5, 0.2] if changed else [np.nan] * 3)
        previous = snapshot
        writer.append(SnapshotRecord(
            step=step,
            wall_time=1_700_000_000.0 + 10.0 * t,
            counts=np.asarray(counts, dtype=np.int64),
            null_overlap=np.asarray(nulls, dtype=np.float64),
            rows=[m.sum(axis=1).astype(np.int32) for m in snapshot],
            cols=[m.sum(axis=0).astype(np.int32) for m in snapshot],
            packed=[np.packbits(m.ravel()) for m in snapshot],
            spectral=None if spectral is None else spectral[t],
        ))
    writer.finalize("finished")
    return MaskRun(Path(path), params, list(steps), masks, reference)


def growing_masks(params: list[ParamSpec], steps: int, rng: np.random.Generator, *, final: list[np.ndarray] | None = None) -> list[list[np.ndarray]]:
    """Masks that grow over ``steps`` snapshots (each a subset of the next), ending at ``final`` if given."""
    if final is None:
        final = [rng.random(p.shape) < rng.uniform(0.2, 0.6) for p in params]
    order = [rng.random(p.shape) for p in params]
    out = []
    for t in range(steps):
        level = (t + 1) / steps
        out.append([f & (u <= level) for f, u in zip(final, order)])
    return out


def spectral_rows(params: list[ParamSpec], steps: int, every: int = 2) -> list[np.ndarray | None]:
    """Spectral rows on every ``every``-th snapshot: NSS, angles (deg) and energy growing with time and layer."""
    rows: list[np.ndarray | None] = []
    for t in range(steps):
        if t % every:
            rows.append(None)
            continue
        row = np.zeros((len(params), len(SPECTRAL_FIELDS)))
        for i, p in enumerate(params):
            scale = (t + 1) * (1 + p.layer)
            row[i] = [1e-5 * scale * (1 + i % 3), 0.1 * scale, 0.12 * scale, 2e-5 * scale]
        rows.append(row)
    return rows
