"""Continuing a run store with a sharded model, on any number of ranks.

The store's layout does not depend on the world size, so a run written by N
ranks (or one process) continues on M ranks. Rank 0 reads the store and runs
the same checks as a single-process resume (``store.resume``: not live, same
parameter layout and measurement settings, W0 stored and matching its
fingerprint); its verdict is shared, so every rank raises the same error or
none does. Rank 0 then scatters to each rank, matrix by matrix, what the
rank's current shard needs: the W0 bf16 codes of its range (2 bytes per
weight), the reference masks and the kept snapshot's mask (4 bits per
weight), packed over the global bytes the range touches. The check that the
model descends from W0 (it differs from W0 almost only where the kept
snapshot says weights had changed) is computed on each rank's range and
summed with one all-reduce.
"""

from __future__ import annotations

import os
import socket
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .bf16 import ABS_MASK, INF_BITS, bf16_bits
from .config import MonitorConfig
from .distributed import Comm, ShardState, aligned_nbytes, pack_aligned
from .matrix_probe import base_fingerprint
from .store import schema

if TYPE_CHECKING:  # pragma: no cover
    from .sharded_monitor import ShardedMonitor

__all__ = ["agreed_config", "resume", "rewind", "slice_aligned"]


def _clear_outside(local: np.ndarray, start: int, numel: int) -> np.ndarray:
    """Zero the bits of an aligned local packed mask that lie outside [start, start + numel)."""
    if local.size:
        lead = start % 8
        if lead:
            local[0] &= np.uint8(0xFF >> lead)
        tail = (start + numel) % 8
        if tail:
            local[-1] &= np.uint8((0xFF << (8 - tail)) & 0xFF)
    return local


def slice_aligned(packed: np.ndarray, start: int, numel: int) -> np.ndarray:
    """Bits [start, start + numel) of a whole packed mask, over the global bytes they touch (others zero)."""
    nbytes = aligned_nbytes(start, numel)
    out = np.array(packed[start // 8 : start // 8 + nbytes], dtype=np.uint8, copy=True)
    return _clear_outside(out, start, numel)


def _agree(comm: Comm, verdict: tuple[str, str] | None, payload: Any = None) -> Any:
    """Rank 0's verdict and payload on every rank; raises rank 0's error everywhere."""
    got = comm.all_gather_object((verdict, payload) if comm.rank == 0 else (None, None))[0]
    error, value = got
    if error is not None:
        kind, message = error
        from .config import ConfigError

        cls = {
            "ResumeError": schema.ResumeError,
            "NotARunError": schema.NotARunError,
            "SchemaVersionError": schema.SchemaVersionError,
            "ConfigError": ConfigError,
        }.get(kind, schema.StoreError)
        raise cls(message)
    return value


def agreed_config(comm: Comm, run_dir: Any, config: MonitorConfig | None) -> MonitorConfig:
    """The resumed run's configuration, decided on rank 0 (``store.resume.resume_config``)."""
    from .store.resume import resume_config

    verdict, payload = None, None
    if comm.rank == 0:
        try:
            payload = resume_config(run_dir, config).to_dict()
        except Exception as exc:  # noqa: BLE001 - shared, then raised on every rank
            verdict = (type(exc).__name__, str(exc))
    values = _agree(comm, verdict, payload)
    known = {f.name for f in fields(MonitorConfig)}
    return MonitorConfig(**{k: v for k, v in values.items() if k in known})


def _read_plan(mon: "ShardedMonitor", run_dir: Any, resume_step: int | None) -> tuple[Any, dict[str, Any]]:
    """Rank 0: open and check the store; what to keep. (run, plan)"""
    from .store.async_writer import AsyncWriter
    from .store.reader import open_run
    from .store.resume import _check_layout, _check_not_live, _refuse

    AsyncWriter.release(run_dir)  # a monitor of this process that was never closed stops writing first
    run = open_run(run_dir)
    _check_not_live(run)
    _check_layout(run, mon.specs)
    if not run.commit.get("base_weights", False):
        raise _refuse(
            run_dir,
            "the store holds no base weights W0 (created with store_base=False, or its writer stopped before "
            "writing them); without W0 the run cannot be continued. Start a new run store.",
        )
    return run, _keep_plan(run, resume_step)


def _keep_plan(run: Any, resume_step: int | None) -> dict[str, Any]:
    from .store.resume import _refuse

    steps = run.steps
    step = int(resume_step) if resume_step is not None else int(run.commit.get("last_step") or 0)
    if step < 0:
        raise _refuse(run.path, f"resume_step must be >= 0, got {step}")
    keep = int(np.searchsorted(steps, step, side="right"))
    latest = (int(steps[keep - 1]), run.counts[keep - 1], run.null_overlap[keep - 1]) if keep else None
    return {
        "step": step,
        "keep": keep,
        "dropped": run.num_snapshots - keep,
        "last_snapshot_step": int(steps[keep - 1]) if keep else None,
        "latest": latest,
        "class_counts": run.base_class_counts,
    }


def _scatter_states(mon: "ShardedMonitor", run: Any, keep: int, *, with_base: bool) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Each rank's W0 codes (if ``with_base``), reference masks and kept mask, scattered matrix by matrix from rank 0."""
    comm, core = mon.comm, mon.core
    geometry = core.geometry
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
                        f"cannot resume {run.path}: the stored base W0 of {mon.specs[p].name!r} does not match its "
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
    _agree(comm, ("ResumeError", bad) if bad else None)
    return codes_out, refs_out, prev_out


@torch.no_grad()
def _check_descends(mon: "ShardedMonitor", run_dir: Any, keep: int, where: str) -> None:
    """Every rank counts, on its range, weights that differ from W0 among those still unchanged at the kept snapshot."""
    from .store.resume import MAX_UNEXPLAINED_CHANGE, _refuse

    core = mon.core
    P = len(core.states)
    counts = torch.zeros((P, 2), dtype=torch.int64)
    for p, state in enumerate(core.states):
        if not state.numel:
            continue
        current = bf16_bits(state.shard.local()).to(state.base_bits.device)
        base = state.base_bits
        changed = (current != base) & (((current | base) & ABS_MASK) != 0) | ((current & ABS_MASK) > INF_BITS)
        packed = pack_aligned(changed.cpu().numpy(), state.start)
        previous = state.previous_packed.cpu().numpy()
        still = _clear_outside(np.bitwise_not(previous), state.start, state.numel)
        counts[p, 0] = int(np.bitwise_count(still).sum(dtype=np.int64))
        counts[p, 1] = int(np.bitwise_count(packed & still).sum(dtype=np.int64))
    mon.comm.all_reduce(counts)
    unchanged, differing = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    if unchanged and differing / unchanged > MAX_UNEXPLAINED_CHANGE:
        ratios = [(int(d) / int(u) if u else 0.0, mon.specs[p].name) for p, (u, d) in enumerate(counts.tolist())]
        worst = max(ratios)
        raise _refuse(
            run_dir,
            f"the model's weights differ from the stored base W0 at {differing / unchanged:.1%} of the weights that were "
            f"still unchanged at {where} (worst: {worst[1]!r}, {worst[0]:.1%}); a checkpoint of this run differs there "
            "only by the steps since. The model does not descend from this run's base: start a new run store.",
        )


def _set_states(mon: "ShardedMonitor", codes: list[np.ndarray], refs: list[np.ndarray], prevs: list[np.ndarray]) -> None:
    core = mon.core
    states = []
    for p, shard in enumerate(core.layout.shards):
        start, numel = core.geometry.ranges[p][core.rank]
        device = torch.device("cpu") if mon.config.base_device == "cpu" else (shard.values().device if shard.numel else torch.device("cpu"))
        states.append(
            ShardState(
                shard=shard,
                start=start,
                numel=numel,
                base_bits=torch.from_numpy(codes[p]).to(device),
                reference_packed=torch.from_numpy(refs[p]).to(device),
                previous_packed=torch.from_numpy(prevs[p]).to(device),
            )
        )
    core.states = states


def resume(mon: "ShardedMonitor", run_dir: Any, *, resume_step: int | None, run_name: str | None, metadata: dict[str, Any] | None) -> None:
    """Continue the store at ``run_dir`` on this world size (a collective; see the module doc)."""
    from .sharded_monitor import _RankWriter
    from .store.writer import RunWriter

    comm = mon.comm
    run, plan, verdict = None, None, None
    if comm.rank == 0:
        try:
            run, plan = _read_plan(mon, run_dir, resume_step)
        except Exception as exc:  # noqa: BLE001 - shared, then raised on every rank
            verdict = (type(exc).__name__, str(exc))
    plan = _agree(comm, verdict, plan)
    comm.phase = "resume"
    codes, refs, prevs = _scatter_states(mon, run, plan["keep"], with_base=True)
    _set_states(mon, codes, refs, prevs)
    where = f"snapshot step {plan['last_snapshot_step']}" if plan["keep"] else "the start of the run"
    _check_descends(mon, run_dir, plan["keep"], where)
    store, verdict = None, None
    if comm.rank == 0:
        try:
            store = RunWriter.open_existing(run_dir, key_interval=mon.config.key_interval)
            event = {"step": plan["step"], "pid": os.getpid(), "host": socket.gethostname(), "world_size": comm.world_size}
            if run_name or metadata:
                event.update({"run_name": run_name, "metadata": metadata or {}})
            store.resume(plan["keep"], event=event)
        except Exception as exc:  # noqa: BLE001
            verdict = (type(exc).__name__, str(exc))
    _agree(comm, verdict)
    comm.phase = "idle"
    mon._class_counts = np.asarray(plan["class_counts"])
    mon.step = plan["step"]
    mon._last_snapshot_step = plan["last_snapshot_step"]
    mon._latest = plan["latest"]
    mon._snapshots_taken = plan["keep"]  # agreed on every rank: the spectral gathers stay in lockstep
    mon.writer = mon._start_writer(store) if store is not None else _RankWriter(run_dir)


def rewind(mon: "ShardedMonitor", step: int) -> None:
    """Drop the snapshots after ``step`` and restore the previous masks (``load_state_dict``; a collective)."""
    from .store.reader import open_run

    comm = mon.comm
    run, plan, verdict = None, None, None
    if comm.rank == 0:
        try:
            mon.writer.flush()
            if mon.writer.error is not None:
                mon._raise_writer_error()
            run = open_run(mon.run_dir)
            plan = _keep_plan(run, step)
            mon.writer.call(lambda store: store.resume(plan["keep"], event={"step": step, "by": "load_state_dict", "world_size": comm.world_size}))
        except Exception as exc:  # noqa: BLE001
            verdict = (type(exc).__name__, str(exc))
    plan = _agree(comm, verdict, plan)
    _, _, prevs = _scatter_states(mon, run, plan["keep"], with_base=False)
    for state, prev in zip(mon.core.states, prevs):
        state.previous_packed = torch.from_numpy(prev).to(state.base_bits.device)
    mon.step = plan["step"]
    mon._last_snapshot_step = plan["last_snapshot_step"]
    mon._latest = plan["latest"]
    mon._snapshots_taken = plan["keep"]  # agreed on every rank: the spectral gathers stay in lockstep
