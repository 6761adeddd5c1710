"""Continuing a run store, on any number of ranks (one resume path; on one rank the agreement is a no-op).

Resuming never takes the base from the model (at resume time the model is a
checkpoint, not W0): rank 0 reads the store and checks it, and its verdict is
shared, so every rank raises the same error or none does. Refused, with a
message naming what differs:

* a store without stored base weights (created with ``store_base=False``);
* another parameter layout (names, roles, module types, layers, shapes);
* other measurement settings (``principal_rank``, ``alpha``, selection fields);
* a stored base that no longer matches its fingerprint (a damaged store);
* a model that does not descend from the stored base: among the weights that
  were still unchanged at the kept snapshot, a checkpoint of this run differs
  from W0 only where the steps since then changed it (typically a few
  percent); a model trained from another base differs almost everywhere;
* a store that another live process on this host is writing.

Rank 0 then scatters to each rank, matrix by matrix, what the rank's shard
needs: the W0 bf16 codes of its range (2 bytes per weight), the reference
masks and the kept snapshot's mask (4 bits per weight), packed over the global
bytes the range touches. The descent check is computed on each rank's range
and summed with one all-reduce. The store's layout does not depend on the
world size, so a run written by N ranks (or one process) continues on M.

The functions return records (:class:`ResumePoint`) that the monitor applies
to itself; nothing here writes another module's state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .bf16 import ABS_MASK, INF_BITS, bf16_bits
from .collectives import Comm
from .config import ConfigError, MonitorConfig
from .matrix_probe import base_fingerprint
from .probe import ShardProbe
from .shard_geometry import aligned_nbytes, clear_outside, pack_aligned, slice_aligned
from .store import schema
from .store.reader import Run, open_run

__all__ = ["ResumePoint", "agree", "agreed_config", "resume_config", "read_resume_point", "restore_probe", "rewind_point", "last_seen_step", "unmonitored_gap", "MEASUREMENT_FIELDS", "MAX_UNEXPLAINED_CHANGE"]

#: Config fields that define what is measured; a resumed run must keep them.
MEASUREMENT_FIELDS = (
    "principal_rank",
    "alpha",
    "include_linear",
    "include_embeddings",
    "include_lm_head",
    "include_norms",
    "include_biases",
    "name_pattern",
)
#: Refuse a model whose weights differ from W0 at more than this fraction of the
#: weights the kept snapshot records as unchanged (a wrong base gives ~0.99).
MAX_UNEXPLAINED_CHANGE = 0.9


@dataclass
class ResumePoint:
    """Where a resumed (or rewound) run continues, agreed on every rank.

    Attributes:
        step: the optimizer step training continues from.
        keep: committed snapshots kept (those at steps <= ``step``).
        dropped: snapshots dropped from the store.
        last_snapshot_step: step of the last kept snapshot, None if none is kept.
        latest: (step, counts (P, 6), null (P, 3)) of the last kept snapshot, or None.
        class_counts: the stored base class counts (P, 4, 512).
        gap: ``(last_seen, step)`` when training went on without the monitor between the last step the
            store saw and ``step`` (see :func:`unmonitored_gap`), else None.
        unseen_from: with a gap, the first step certainly trained without the monitor (the first
            snapshot due after the last seen step).
    """

    step: int
    keep: int
    dropped: int
    last_snapshot_step: int | None
    latest: tuple[int, np.ndarray, np.ndarray] | None
    class_counts: np.ndarray
    gap: tuple[int, int] | None = None
    unseen_from: int | None = None


def _refuse(run_dir: Any, what: str) -> schema.ResumeError:
    return schema.ResumeError(f"cannot resume {run_dir}: {what}")


_ERRORS: dict[str, type[Exception]] = {
    "ResumeError": schema.ResumeError,
    "NotARunError": schema.NotARunError,
    "SchemaVersionError": schema.SchemaVersionError,
    "StoreExistsError": schema.StoreExistsError,
    "ConfigError": ConfigError,
}


def agree(comm: Comm, work: Any, *, share: bool = True) -> Any:
    """Run ``work()`` on rank 0; its error is raised on every rank.

    Returns its value on every rank (``share``: it must pickle), or on rank 0 only
    (None elsewhere) when ``share`` is False.
    """
    verdict, value = None, None
    if comm.rank == 0:
        try:
            value = work()
        except Exception as exc:  # noqa: BLE001 - shared, then raised on every rank
            verdict = (type(exc).__name__, str(exc), exc)
    if comm.world_size == 1:
        if verdict is not None:
            raise verdict[2]
        return value
    got = comm.all_gather_object((verdict[:2] if verdict else None, value if comm.rank == 0 and share else None))[0]
    error, shared = got
    if error is not None:
        kind, message = error
        raise _ERRORS.get(kind, schema.StoreError)(message)
    return shared if share else (value if comm.rank == 0 else None)


def resume_config(run_dir: str | os.PathLike[str], config: MonitorConfig | None) -> MonitorConfig:
    """The configuration of a resumed run: the stored one if none is given, else ``config``
    after checking that its measurement settings equal the stored ones."""
    run = open_run(run_dir)
    stored = run.config
    if config is None:
        known = {f.name for f in fields(MonitorConfig)}
        return MonitorConfig(**{k: v for k, v in stored.items() if k in known})
    differing = [
        f"{name}={getattr(config, name)!r} (the store has {stored[name]!r})"
        for name in MEASUREMENT_FIELDS
        if name in stored and getattr(config, name) != stored[name]
    ]
    if differing:
        raise _refuse(run_dir, "the configuration measures differently from the stored run: " + ", ".join(differing))
    return config


def agreed_config(comm: Comm, run_dir: Any, config: MonitorConfig | None) -> MonitorConfig:
    """:func:`resume_config`, decided on rank 0."""
    values = agree(comm, lambda: resume_config(run_dir, config).to_dict())
    known = {f.name for f in fields(MonitorConfig)}
    return MonitorConfig(**{k: v for k, v in values.items() if k in known})


def _check_layout(run: Run, specs: list[Any]) -> None:
    stored = run.params
    if [p.name for p in stored] != [s.name for s in specs]:
        have = {s.name for s in specs}
        had = {p.name for p in stored}
        missing, new = sorted(had - have), sorted(have - had)
        if missing or new:
            detail = []
            if missing:
                detail.append(f"the model lacks {len(missing)} stored parameter(s), e.g. {missing[:3]}")
            if new:
                detail.append(f"the model has {len(new)} parameter(s) the store lacks, e.g. {new[:3]}")
            raise _refuse(run.path, "the monitored parameters differ: " + "; ".join(detail))
        raise _refuse(run.path, "the monitored parameters are the same but in another order")
    for p, s in zip(stored, specs):
        if tuple(s.shape) != tuple(p.shape):
            raise _refuse(run.path, f"parameter {s.name!r} has shape {tuple(s.shape)}, the store has {tuple(p.shape)}")
        if (s.role, s.module_type, s.layer) != (p.role, p.module_type, p.layer):
            raise _refuse(
                run.path,
                f"parameter {s.name!r} is ({s.role}, {s.module_type}, layer {s.layer}), "
                f"the store has ({p.role}, {p.module_type}, layer {p.layer})",
            )


def _check_not_live(run: Run) -> None:
    writer = run.commit.get("writer") or {}
    if run.status == "running" and writer.get("pid") not in (None, os.getpid()) and run.writer_alive:
        age = run.heartbeat_age
        raise _refuse(run.path, f"process {writer['pid']} on this host is still writing it (heartbeat {age:.0f} s ago); stop it first")


def last_seen_step(run: Run, upto: int | None = None) -> int:
    """The last optimizer step (at most ``upto``) the store is known to have seen, 0 (the base) if none.

    Seen are: the commit's ``last_step`` and the stored snapshots' steps, the steps of snapshots skipped
    because the writer was behind (``gaps``), and the steps of the ``resumed`` and ``disabled`` events
    that a later resume did not rewind past (a resume at step r abandons what was recorded after r).
    """
    marks: list[int] = [0]
    for event in run.history:
        step = event.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if event.get("event") == "resumed":
            marks = [m for m in marks if m <= step]
            marks.append(step)
        elif event.get("event") == "disabled":
            marks.append(step)
    last = run.commit.get("last_step")
    if last is not None:
        marks.append(int(last))
    marks += [int(x) for x in run.steps]
    marks += [int(g[1]) for g in run.gaps]
    if upto is not None:
        marks = [m for m in marks if m <= upto]
    return max(marks, default=0)


def _first_due(run: Run, seen: int) -> int:
    """The first step after ``seen`` at which the run's cadence (``every_n_steps``) has a snapshot due."""
    every = run.config.get("every_n_steps", 1)
    every = every if isinstance(every, int) and not isinstance(every, bool) and every > 0 else 1
    return (seen // every + 1) * every


def unmonitored_gap(run: Run, step: int) -> tuple[int, int] | None:
    """``(last_seen, step)`` when continuing at ``step`` means steps were trained without the monitor
    (``last_seen``: the last step at most ``step`` the store saw, :func:`last_seen_step`), else None.

    That is certain once the run's cadence had a snapshot due after the last seen step and at or before
    ``step``: a monitor that saw that step would have stored it (or recorded skipping it). A resume
    between two due snapshots (the usual checkpoint between snapshots) is not a gap.
    """
    seen = last_seen_step(run, upto=int(step))
    return (seen, int(step)) if step >= _first_due(run, seen) else None


def _keep_point(run: Run, resume_step: int | None) -> ResumePoint:
    steps = run.steps
    step = int(resume_step) if resume_step is not None else int(run.commit.get("last_step") or 0)
    if step < 0:
        raise _refuse(run.path, f"resume_step must be >= 0, got {step}")
    gap = unmonitored_gap(run, step)
    keep = int(np.searchsorted(steps, step, side="right"))
    latest = (int(steps[keep - 1]), run.counts[keep - 1], run.null_overlap[keep - 1]) if keep else None
    return ResumePoint(
        step=step,
        keep=keep,
        dropped=run.num_snapshots - keep,
        last_snapshot_step=int(steps[keep - 1]) if keep else None,
        latest=latest,
        class_counts=np.asarray(run.base_class_counts),
        gap=gap,
        unseen_from=_first_due(run, gap[0]) if gap else None,
    )


def read_resume_point(comm: Comm, run_dir: Any, specs: list[Any], resume_step: int | None) -> tuple[Run | None, ResumePoint]:
    """Rank 0 opens and checks the store; every rank gets what to keep. (run on rank 0, point)."""
    opened: list[Run] = []

    def work() -> ResumePoint:
        run = open_run(run_dir)
        _check_not_live(run)
        _check_layout(run, specs)
        if not run.commit.get("base_weights", False):
            raise _refuse(
                run_dir,
                "the store holds no base weights W0 (created with store_base=False, or its writer stopped before "
                "writing them); without W0 the run cannot be continued. Start a new run store.",
            )
        opened.append(run)
        return _keep_point(run, resume_step)

    point = agree(comm, work)
    return (opened[0] if opened else None), point


def _scatter_states(probe: ShardProbe, run: Run | None, keep: int, *, with_base: bool) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Each rank's W0 codes (if ``with_base``), reference masks and kept mask, scattered matrix by matrix from rank 0."""
    comm, geometry = probe.comm, probe.geometry
    W = comm.world_size
    codes_out, refs_out, prev_out = [], [], []
    bad: str | None = None
    fingerprints = run.base_fingerprint if (comm.rank == 0 and with_base) else None
    for p, (m, n) in enumerate(geometry.shapes):
        sizes = []
        for r in range(W):
            start, numel = geometry.ranges[p][r]
            nb = aligned_nbytes(start, numel)
            sizes.append((2 * numel if with_base else 0) + 3 * nb + nb)
        size = max(sizes)
        pieces = None
        if comm.rank == 0:
            codes = None
            if with_base:
                codes = np.ascontiguousarray(run.base_codes(p), dtype=np.int16).reshape(-1)
                if bad is None and not np.array_equal(base_fingerprint(torch.from_numpy(codes)).numpy(), fingerprints[p]):
                    bad = (
                        f"cannot resume {run.path}: the stored base W0 of {probe.specs[p].name!r} does not match its "
                        "fingerprint (the store is damaged or was modified)"
                    )
            refs = [np.packbits(run.reference_mask(p, w).ravel()) for w in schema.REFERENCE_MASKS]
            prev = run.packed_mask(p, keep - 1) if keep else np.zeros((m * n + 7) // 8, dtype=np.uint8)
            pieces = []
            for r in range(W):
                start, numel = geometry.ranges[p][r]
                parts = [codes[start : start + numel].view(np.uint8)] if with_base else []
                parts += [slice_aligned(x, start, numel) for x in refs] + [slice_aligned(prev, start, numel)]
                buf = np.zeros(size, dtype=np.uint8)
                flat = np.concatenate(parts) if parts else buf[:0]
                buf[: flat.size] = flat
                pieces.append(torch.from_numpy(buf))
        local = comm.scatter(pieces, torch.zeros(size, dtype=torch.uint8)).numpy()
        start, numel = geometry.ranges[p][comm.rank]
        nb = aligned_nbytes(start, numel)
        offset = 0
        if with_base:
            codes_out.append(local[: 2 * numel].view(np.int16).copy())
            offset = 2 * numel
        refs_out.append(local[offset : offset + 3 * nb].reshape(3, nb).copy())
        prev_out.append(local[offset + 3 * nb : offset + 4 * nb].copy())

    def verdict() -> None:
        if bad:
            raise schema.ResumeError(bad)

    agree(comm, verdict)
    return codes_out, refs_out, prev_out


@torch.no_grad()
def _check_descends(probe: ShardProbe, run_dir: Any, where: str) -> None:
    """Every rank counts, on its range, weights that differ from W0 among those still unchanged at the kept snapshot."""
    P = len(probe.states)
    counts = torch.zeros((P, 2), dtype=torch.int64)
    for p, state in enumerate(probe.states):
        if not state.numel:
            continue
        current = bf16_bits(state.shard.local()).to(state.base_bits.device)
        base = state.base_bits
        changed = (current != base) & (((current | base) & ABS_MASK) != 0) | ((current & ABS_MASK) > INF_BITS)
        packed = pack_aligned(changed.cpu().numpy(), state.start)
        previous = state.previous_packed.cpu().numpy()
        still = clear_outside(np.bitwise_not(previous), state.start, state.numel)
        counts[p, 0] = int(np.bitwise_count(still).sum(dtype=np.int64))
        counts[p, 1] = int(np.bitwise_count(packed & still).sum(dtype=np.int64))
    probe.comm.all_reduce(counts)
    unchanged, differing = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    if unchanged and differing / unchanged > MAX_UNEXPLAINED_CHANGE:
        ratios = [(int(d) / int(u) if u else 0.0, probe.specs[p].name) for p, (u, d) in enumerate(counts.tolist())]
        worst = max(ratios)
        raise _refuse(
            run_dir,
            f"the model's weights differ from the stored base W0 at {differing / unchanged:.1%} of the weights that were "
            f"still unchanged at {where} (worst: {worst[1]!r}, {worst[0]:.1%}); a checkpoint of this run differs there "
            "only by the steps since. The model does not descend from this run's base: start a new run store.",
        )


def restore_probe(probe: ShardProbe, run: Run | None, point: ResumePoint, run_dir: Any) -> None:
    """Give the probe W0, the reference masks and the kept mask from the store, then check descent (a collective)."""
    probe.comm.phase = "resume"
    codes, refs, prevs = _scatter_states(probe, run, point.keep, with_base=True)
    probe.restore(codes, refs, prevs)
    where = f"snapshot step {point.last_snapshot_step}" if point.keep else "the start of the run"
    _check_descends(probe, run_dir, where)
    probe.comm.phase = "idle"


def rewind_point(probe: ShardProbe, writer: Any, run_dir: Any, step: int) -> ResumePoint:
    """Drop the snapshots after ``step`` and restore the previous masks (``load_state_dict``; a collective)."""
    comm = probe.comm
    opened: list[Run] = []

    def work() -> ResumePoint:
        writer.flush()
        if writer.error is not None:
            raise RuntimeError(f"the run-store writer failed ({writer.error_context}): {type(writer.error).__name__}: {writer.error}")
        run = open_run(run_dir)
        point = _keep_point(run, step)
        event: dict[str, Any] = {"step": step, "by": "load_state_dict", "world_size": comm.world_size}
        if point.gap is not None:
            event["gap"] = list(point.gap)  # [last step the store saw, step rewound to]: trained unmonitored
        writer.call(lambda store: store.resume(point.keep, event=event))
        opened.append(run)
        return point

    point = agree(comm, work)
    _, _, prevs = _scatter_states(probe, opened[0] if opened else None, point.keep, with_base=False)
    probe.set_previous(prevs)
    return point
