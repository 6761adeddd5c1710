"""The per-rank probe: W0 of the ranges this rank holds, and their measurement per snapshot.

Every rank holds, per monitored matrix, a :class:`~compass_monitor.sharding.LocalShard`
(a contiguous range of the global row-major flat indices). A plain model in
one process is the trivial case: one rank holding every matrix whole, where
every collective is the identity (``collectives.Comm``) and aligned packing is
``np.packbits``. The base, the reference masks and every snapshot are computed
on the local ranges only and combined with a few collectives that every rank
runs in the same order (none is ever gated on a rank). No collective on the
per-snapshot path moves a weight.

Per snapshot (:meth:`ShardProbe.measure` / :meth:`ShardProbe.reduce` /
:meth:`ShardProbe.collect`), two collectives:

1. ``all_reduce`` (sum) of one int64 buffer: a few status flags (so that every
   rank agrees on skipping, failing, disabling) and the six counts of every
   matrix (``|M|``, the three overlaps, flips, non-finite); popcounts of the
   local ranges add up to the global counts. Every rank then holds the global
   counts (for loggers on any rank). ``(2 + 6 P) * 8`` bytes.
2. ``gather`` to rank 0 (the only writer), within the ranks that contribute
   anything, of one uint8 buffer per rank: per matrix, the int32 partial row
   counts of the rows the range touches, the int32 partial column counts
   (n), and the changed mask of the range packed 1 bit per weight, aligned to
   the global bytes it covers (``shard_geometry.pack_aligned``). Rank 0 adds
   the row/column partials (a row split between two ranks, as FSDP1 flat
   shards do, is summed) and ORs the bytes: the global packed mask, rows and
   columns, exactly as a single process computes them. Gather needs equal
   sizes: each buffer is padded to the largest rank's (known to all from the
   geometry). About ``numel / 8 + 4 (rows + P n)`` bytes per rank: 1/16 of the
   bf16 weights, 1/32 of fp32 master weights. On one rank nothing is packed
   into a buffer: the pieces are the matrices' results.

The store writes each mask with a codec over the whole matrix (key frames +
XOR deltas), so per-rank chunk-aligned writes do not fit it: rank 0 writes,
and the store's layout does not depend on the number of ranks.

Once, for the base (:meth:`ShardProbe.capture_base`): the geometry (which rank
holds which range; checked to cover every matrix exactly once), the principal
score (``principal_sharded``), an exact global top-count selection
(``exact_selection``), one all-reduce of the spacing-class counts,
fingerprints (position-weighted sums with global indices, mod p) and
non-finite counts, and a gather of the packed reference masks (3 bits per
weight) and, if the store keeps W0, of the bf16 codes (2 bytes per weight,
matrix by matrix) to rank 0.

Memory per rank: the base copy, 2 bytes per local weight, on the parameter's
device or in CPU memory (``base_device="cpu"``), plus half a bit per local
weight (three reference masks and the previous mask, packed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .bf16 import ABS_MASK, INF_BITS, bf16_bits, canonical_bits
from .collectives import Comm
from .config import MonitorConfig
from .exact_selection import select_count, top_count_masks
from .matrix_probe import _FP_MOD, ShardState, base_codes, fingerprint_partial, measure_range, resident
from .precision_null import NUM_CLASSES as _NUM_CLASSES
from .precision_null import class_counts as _class_counts
from .principal_sharded import ShardedPrincipal
from .shard_geometry import aligned_nbytes, check_geometry, pack_aligned
from .sharding import ShardingError, ShardLayout
from .state_spill import OffloadedArrays, StateSpill, return_freed_memory

__all__ = ["ShardProbe", "LocalSnapshot", "BaseCapture", "BASE_GROUP_ELEMENTS"]

log = logging.getLogger(__name__)

#: Local weights (the largest rank's) per group of matrices whose base is computed together.
BASE_GROUP_ELEMENTS = 1 << 26
_FLAG_FIELDS = ("error", "skip")


@dataclass
class LocalSnapshot:
    """One rank's measurement of every matrix (host arrays), before the collectives.

    ``pieces[p]`` is matrix p's (partial rows, partial columns, aligned packed mask)
    as host arrays (None where the rank holds none of it).
    """

    counts: np.ndarray  # (P, 6) int64
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = field(default_factory=list)
    packed: list[torch.Tensor] = field(default_factory=list)  # per matrix, for the previous-mask update
    error: str | None = None


@dataclass
class BaseCapture:
    """What :meth:`ShardProbe.capture_base` found, global on every rank (numpy).

    Attributes:
        class_counts: (P, 4, precision_null.NUM_CLASSES) int64 precision-null classes (bf16 spacing x
            position in its cell) of the original W0, overall and inside its reference masks.
        fingerprints: (P, 2) int64 base fingerprints.
        nonfinite: (P,) int64 NaN/Inf values in W0.
        reference_packed: rank 0: per matrix (3, nbytes) uint8 of the whole matrix; None elsewhere.
        base_codes: rank 0 with ``want_codes``: per matrix (m*n,) int16; None otherwise.
    """

    class_counts: np.ndarray
    fingerprints: np.ndarray
    nonfinite: np.ndarray
    reference_packed: list[np.ndarray] | None = None
    base_codes: list[np.ndarray] | None = None


class ShardProbe:
    """Base capture and per-snapshot measurement of one rank's shards (see the module doc).

    Every method that runs a collective must be called on every rank of the
    group in the same order. Construction agrees on the geometry (a collective):
    every rank raises the same error, or none does.

    Args:
        layout: this rank's shards (``sharding.discover_shards``); None with ``error``.
        config: the monitor configuration (principal rank, alpha, base device).
        comm: the collectives (default: on ``layout.group``).
        error: a discovery error of this rank, raised on every rank.
    """

    def __init__(self, layout: ShardLayout | None, config: MonitorConfig, *, comm: Comm | None = None, error: BaseException | None = None) -> None:
        self.config = config
        self.comm = comm or Comm(layout.group if layout is not None else None)
        self.base_device = None if config.base_device in (None, "param") else torch.device(config.base_device)
        shards = layout.shards if layout is not None else []
        report: dict[str, Any] = {
            "names": [s.spec.name for s in shards],
            "shapes": [list(s.spec.shape) for s in shards],
            "ranges": [[s.start, s.numel] if s.contributes and s.numel else [0, 0] for s in shards],
        }
        for s in shards:
            if s.numel and not 0 <= s.start <= s.start + s.numel <= s.spec.numel:
                report["error"] = f"parameter {s.spec.name!r}: local range [{s.start}, {s.end}) outside its {s.spec.numel} elements"
        if error is not None:
            report["error"] = str(error)
            report["error_type"] = type(error).__name__
        # Every rank raises the same error, or none does (a rank that raised alone would leave the others waiting).
        self.geometry = check_geometry(self.comm.all_gather_object(report))
        assert layout is not None
        self.layout = layout
        self.members = self.geometry.members()
        self.subgroup = self.comm.new_subgroup(self.members)
        self.states: list[ShardState] = []
        #: measurement code path: ``auto`` (numpy when W0 is in CPU memory, torch ops on its device otherwise)
        self.backend = "auto"
        #: where each matrix's parameter lives in the model, checked before each measurement (``watch_replacements``)
        self.bindings: Any = None
        #: the step of the snapshot being measured (set by the monitor; for messages only)
        self.snapshot_step: int | None = None
        #: where the per-matrix state is kept when the base can be reread (``capture_base``); None: in memory
        self.spill: StateSpill | None = None

    @classmethod
    def from_model(cls, model: Any, config: MonitorConfig, *, group: Any = None, comm: Comm | None = None, optimizer: Any = None) -> "ShardProbe":
        """Discover this rank's shards of ``model`` and agree on the geometry with every rank (a collective);
        ``optimizer``: parameters in none of its param groups count as frozen (``sharding.discover_shards``)."""
        from .selection import SelectionError
        from .sharding import discover_shards

        comm = comm or Comm(group)
        try:
            layout, error = discover_shards(model, config, group=group, optimizer=optimizer), None
        except (ShardingError, SelectionError) as exc:
            layout, error = None, exc
        probe = cls(layout, config, comm=comm, error=error)
        probe.watch_replacements(model, optimizer=optimizer)
        return probe

    def watch_replacements(self, model: Any, *, optimizer: Any = None) -> None:
        """Check at each snapshot that every matrix is still read from the tensor ``model`` holds (``bindings``).

        Where a check cannot be set up (an exotic model), snapshots are taken without it, with a warning.
        """
        from .bindings import Bindings

        try:
            self.bindings = Bindings(model, self.layout.shards, self.config, world_size=self.layout.world_size, optimizer=optimizer)
        except Exception as exc:  # noqa: BLE001 - an auxiliary check never keeps training from starting
            self.bindings = None
            log.warning("compass-monitor: cannot check %s for replaced parameters (%s: %s); a replaced module would go unnoticed", type(model).__name__, type(exc).__name__, exc)

    # -- facts ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def is_writer(self) -> bool:
        return self.comm.rank == 0

    @property
    def specs(self) -> list[Any]:
        return self.layout.specs

    def _range(self, p: int) -> tuple[int, int]:
        return self.geometry.ranges[p][self.rank]

    def _starts(self, p: int) -> list[int]:
        return [s if k else -1 for s, k in self.geometry.ranges[p]]

    def _device_of(self, p: int) -> torch.device:
        shard = self.layout.shards[p]
        return shard.values().device if shard.numel else torch.device("cpu")

    # -- base ---------------------------------------------------------------------------
    @torch.no_grad()
    def capture_base(self, *, want_codes: bool = False, spill_dir: Any = None) -> BaseCapture:
        """Take W0 of every local range and compute the reference masks in global coordinates (a collective).

        Where the layout can read the base again (``ShardLayout.base_values``), nothing of W0 is
        kept: each range's masks go to a spill file in ``spill_dir`` (default: the temporary
        folder) and W0 is reread whenever it is needed (``state_spill``).
        """
        self.comm.phase = "base"
        if self.layout.base_values is not None and self.spill is None:
            self.spill = StateSpill(spill_dir)
        cfg = self.config
        P = len(self.layout.shards)
        C = 4 * _NUM_CLASSES
        reduce_buf = torch.zeros(P * (C + 2 + 1), dtype=torch.int64)
        class_block = reduce_buf[: P * C].view(P, 4, _NUM_CLASSES)
        fp_block = reduce_buf[P * C : P * (C + 2)].view(P, 2)
        bad_block = reduce_buf[P * (C + 2) :]
        principal = ShardedPrincipal(self.comm, self.geometry, cfg.principal_rank)
        states: list[ShardState | None] = [None] * P
        for group in self._base_groups():
            bits_of: dict[int, torch.Tensor] = {}
            w0_of: dict[int, torch.Tensor] = {}
            for p in group:
                start, numel = self._range(p)
                if numel:
                    bits = canonical_bits(bf16_bits(self.layout.shards[p].local()).clone())
                else:
                    bits = torch.zeros(0, dtype=torch.int16, device=self._device_of(p))
                bits_of[p] = bits
                # Non-finite base entries would poison the SVD and the selections: they are
                # treated as 0 for the reference masks (and counted, so the monitor warns).
                w0_of[p] = torch.nan_to_num(bits.view(torch.bfloat16).float(), nan=0.0, posinf=0.0, neginf=0.0)
            principal_scores = principal.scores(group, w0_of)
            scores, counts, starts = [], [], []
            for p in group:
                count = select_count(self.layout.shards[p].spec.numel, cfg.alpha)
                scores += [principal_scores.pop(p), -w0_of[p].abs()]  # top of -|W0|: the low-magnitude mask
                counts += [count, count]
                starts += [self._starts(p), self._starts(p)]
            del w0_of, principal_scores
            masks = top_count_masks(self.comm, scores, counts, starts)
            del scores
            for j, p in enumerate(group):
                start, numel = self._range(p)
                bits = bits_of[p]
                principal_mask, low = masks[2 * j], masks[2 * j + 1]
                pnl = principal_mask & ~low
                if numel:
                    class_block[p] = _class_counts(self.layout.shards[p].local(), [principal_mask, low, pnl]).cpu()  # original W0 (precision null)
                    fp_block[p] = fingerprint_partial(bits, start).cpu()
                    bad_block[p] = int(((bits & ABS_MASK) >= INF_BITS).sum())
                    reference = torch.stack([pack_aligned(principal_mask, start), pack_aligned(low, start), pack_aligned(pnl, start)])
                else:
                    reference = torch.zeros((3, 0), dtype=torch.uint8, device=bits.device)
                if self.spill is not None and numel:
                    off = OffloadedArrays(self.spill, self.layout.base_values[p], reference.shape[1], self.base_device or bits.device)
                    off.put_reference(reference.cpu().numpy())
                    # new empty tensors: a zero-length view would keep W0's storage alive
                    states[p] = ShardState(shard=self.layout.shards[p], start=start, numel=numel, base_bits=bits.new_empty(0),
                                           reference_packed=reference.new_empty((3, 0)), previous_packed=reference.new_empty(0), offload=off)
                    continue
                base = bits if self.base_device is None else bits.to(self.base_device)
                ref = reference if self.base_device is None else reference.to(self.base_device)
                states[p] = ShardState(
                    shard=self.layout.shards[p], start=start, numel=numel, base_bits=base, reference_packed=ref, previous_packed=torch.zeros_like(ref[0])
                )
            del masks
            if self.spill is not None:
                return_freed_memory()
        self.states = [s for s in states if s is not None]
        self.comm.all_reduce(reduce_buf)
        result = BaseCapture(
            class_counts=class_block.numpy().copy(),
            fingerprints=(fp_block.numpy() % _FP_MOD).copy(),
            nonfinite=bad_block.numpy().copy(),
            reference_packed=self._gather_reference(),
        )
        if want_codes:
            result.base_codes = self.gather_base_codes()
        self.comm.phase = "idle"
        return result

    def _base_groups(self) -> list[list[int]]:
        """Consecutive matrices whose largest local range (over ranks) sums to at most ``BASE_GROUP_ELEMENTS``.

        The base is computed group by group (about 30 bytes of temporaries per
        local weight of a group); the grouping comes from the geometry, so it is
        the same on every rank. Where W0 is reread (``ShardLayout.base_values``)
        a group holds at most the largest matrix's weights, so the capture's peak
        depends on the largest matrix, not on the model.
        """
        biggest_of = [max(k for _, k in per_rank) for per_rank in self.geometry.ranges]
        limit = BASE_GROUP_ELEMENTS
        if self.layout.base_values is not None and biggest_of:
            # W0 is reread (post hoc, a model that may not fit): the peak is set by the largest matrix
            limit = min(limit, max(biggest_of))
        groups: list[list[int]] = []
        size = 0
        for p, biggest in enumerate(biggest_of):
            if groups and groups[-1] and size + biggest <= limit:
                groups[-1].append(p)
                size += biggest
            else:
                groups.append([p])
                size = biggest
        return groups

    # -- gathers to rank 0 ----------------------------------------------------------------
    def _gather_reference(self) -> list[np.ndarray] | None:
        """The whole reference masks of every matrix on rank 0 (3 bits per weight, one gather)."""
        if self.comm.world_size == 1:
            return _PerMatrix(len(self.states), lambda p: self._reference_of(self.states[p]))
        P = len(self.states)
        pieces = [self._reference_of(s).reshape(-1) for s in self.states]
        mine = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
        sizes = {r: sum(3 * aligned_nbytes(*self.geometry.ranges[p][r]) for p in range(P)) for r in self.members}
        gathered = self._gather_padded(mine, max(sizes.values()))
        if gathered is None:
            return None
        out = [np.zeros((3, (m * n + 7) // 8), dtype=np.uint8) for m, n in self.geometry.shapes]
        for member, buf in zip(self.members, gathered):
            offset = 0
            for p in range(P):
                start, numel = self.geometry.ranges[p][member]
                nb = aligned_nbytes(start, numel)
                if nb:
                    out[p][:, start // 8 : start // 8 + nb] |= buf[offset : offset + 3 * nb].reshape(3, nb)
                    offset += 3 * nb
        return out

    def gather_base_codes(self) -> list[np.ndarray] | None:
        """The base bf16 codes of every matrix on rank 0, one gather per matrix (for the stored W0)."""
        if self.comm.world_size == 1:  # read by the store writer one matrix at a time
            return _PerMatrix(len(self.states), lambda p: self._codes_of(self.states[p]))
        out: list[np.ndarray] | None = [] if self.is_writer else None
        for p, state in enumerate(self.states):
            codes = self._gather_codes(p, self._codes_of(state))
            if out is not None and codes is not None:
                out.append(codes)
        return out

    @staticmethod
    def _reference_of(state: ShardState) -> np.ndarray:
        if state.offload is not None:
            return state.offload.reference()
        return state.reference_packed.cpu().numpy()

    @staticmethod
    def _codes_of(state: ShardState) -> np.ndarray:
        return base_codes(state).cpu().numpy()  # runs on the writer's thread: reads, never mutates, the state

    def whole_matrix(self, p: int, *, base: bool) -> torch.Tensor | None:
        """Matrix ``p`` as an (m, n) bf16 tensor on rank 0 (None elsewhere): W0 or the current weights.

        One rank: a view of what it holds (no copy through the host). Several: a gather
        of the matrix to rank 0, 2 bytes per weight, on the collective device; only for
        the spectral diagnostics, at their own cadence (the masks never need it).
        """
        state, shape = self.states[p], self.geometry.shapes[p]
        base_bits = base_codes(state) if base else state.base_bits
        if self.comm.world_size == 1:
            codes = base_bits if base else bf16_bits(state.shard.local())
            return codes.view(torch.bfloat16).reshape(shape)
        if base:
            mine = base_bits.cpu().numpy()
        elif state.numel:
            mine = bf16_bits(state.shard.local()).cpu().numpy()
        else:
            mine = np.zeros(0, dtype=np.int16)
        codes = self._gather_codes(p, mine)
        return None if codes is None else torch.from_numpy(codes).view(torch.bfloat16).reshape(shape).to(self.comm.device)

    def _gather_codes(self, p: int, mine: np.ndarray) -> np.ndarray | None:
        if self.comm.world_size == 1:
            return np.ascontiguousarray(mine).reshape(-1)
        size = max(2 * self.geometry.ranges[p][r][1] for r in self.members)
        gathered = self._gather_padded(np.ascontiguousarray(mine).view(np.uint8), size)
        if gathered is None:
            return None
        m, n = self.geometry.shapes[p]
        codes = np.zeros(m * n, dtype=np.int16)
        for member, buf in zip(self.members, gathered):
            start, numel = self.geometry.ranges[p][member]
            codes[start : start + numel] = buf[: 2 * numel].view(np.int16)
        return codes

    def _gather_padded(self, mine: np.ndarray, size: int) -> list[np.ndarray] | None:
        """Equal-sized buffers of the members to rank 0 (non-members take no part and get None)."""
        buf = np.zeros(size if self.rank in self.members else 0, dtype=np.uint8)
        buf[: mine.size] = mine
        gathered = self.comm.gather(torch.from_numpy(buf), members=self.members, subgroup=self.subgroup)
        return None if gathered is None else [g.numpy() for g in gathered]

    # -- snapshots ---------------------------------------------------------------------
    def check_replacements(self, step: int | None = None) -> None:
        """Follow monitored parameters replaced by tensors of their shape; raise for one of another shape (no collective).

        Metadata only (module look-ups, identity, data pointer, shape, dtype, device): no weight is read and
        nothing waits for the device (``bindings``).
        """
        if not self.bindings:
            return
        parts = ([f"rank {self.rank}"] if self.comm.world_size > 1 else []) + ([f"step {step}"] if step is not None else [])
        where = f"{', '.join(parts)}: " if parts else ""
        for p, shard in self.bindings.check(self.layout.shards, where=where).items():
            self.layout.shards[p] = shard
            if p < len(self.states):
                self.states[p].shard = shard

    @torch.no_grad()
    def measure(self) -> LocalSnapshot:
        """Measure every local range (no collective), after :meth:`check_replacements`. A failure is reported in ``error``, not raised."""
        P = len(self.states)
        counts = np.zeros((P, 6), dtype=np.int64)
        pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * P
        packed_list: list[torch.Tensor] = []
        on_device: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        try:
            self.check_replacements(self.snapshot_step)
            for p, state in enumerate(self.states):
                if state.numel == 0:
                    packed_list.append(state.previous_packed)
                    continue
                with resident(state):
                    c, rows, cols, packed = measure_range(state, self.geometry.shapes[p], backend=self.backend)
                if state.offload is not None:
                    return_freed_memory()
                packed_list.append(packed)
                if isinstance(c, torch.Tensor):  # accelerator: copied to the host below, once per kind
                    on_device.append((p, c, rows, cols, packed))
                    continue
                counts[p] = c
                pieces[p] = (rows, cols, packed.numpy())
            if on_device:
                host = [torch.cat([t[k].reshape(-1).view(torch.uint8) for t in on_device]).cpu().numpy() for k in (1, 2, 3, 4)]
                offsets = [0, 0, 0, 0]
                for p, *tensors in on_device:
                    chunk = []
                    for k, t in enumerate(tensors):
                        size = t.numel() * t.element_size()
                        chunk.append(host[k][offsets[k] : offsets[k] + size])
                        offsets[k] += size
                    counts[p] = chunk[0].view(np.int64)
                    pieces[p] = (chunk[1].view(np.int32), chunk[2].view(np.int32), chunk[3])
        except Exception as exc:  # reported to every rank through the next all-reduce
            where = f"rank {self.rank}: " if self.comm.world_size > 1 else ""
            return LocalSnapshot(counts=np.zeros((P, 6), dtype=np.int64), error=f"{where}{type(exc).__name__}: {exc}")
        return LocalSnapshot(counts=counts, pieces=pieces, packed=packed_list)

    def reduce(self, snap: LocalSnapshot, *, skip: bool = False, error: bool = False) -> tuple[np.ndarray, dict[str, int]]:
        """Collective 1: global counts (P, 6) and flags on every rank.

        ``flags["error"]``: ranks that failed (``snap.error`` or ``error``);
        ``flags["skip"]``: the writer asked to skip this snapshot.
        """
        self.comm.phase = "snapshot"
        P = len(self.states)
        buf = torch.zeros(len(_FLAG_FIELDS) + P * 6, dtype=torch.int64)
        buf[0] = 1 if (snap.error or error) else 0
        buf[1] = 1 if skip else 0
        buf[len(_FLAG_FIELDS) :] = torch.from_numpy(snap.counts.reshape(-1))
        self.comm.all_reduce(buf)
        flags = {name: int(buf[i]) for i, name in enumerate(_FLAG_FIELDS)}
        return buf[len(_FLAG_FIELDS) :].numpy().reshape(P, 6).copy(), flags

    def collect(self, snap: LocalSnapshot) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] | None:
        """Collective 2: rank 0 gets the whole rows, columns and packed masks; None on other ranks."""
        self.comm.phase = "snapshot"
        shapes = self.geometry.shapes
        if self.comm.world_size == 1:  # every range is its whole matrix: nothing to gather
            empty = [(np.zeros(m, np.int32), np.zeros(n, np.int32), np.zeros((m * n + 7) // 8, np.uint8)) for m, n in shapes]
            whole = [piece if piece is not None else empty[p] for p, piece in enumerate(snap.pieces)]
            return [w[0] for w in whole], [w[1] for w in whole], [w[2] for w in whole]
        mine = [part for piece in snap.pieces if piece is not None for part in (piece[0].view(np.uint8), piece[1].view(np.uint8), piece[2])]
        payload = np.concatenate(mine) if mine else np.zeros(0, dtype=np.uint8)
        size = max(self.geometry.payload_bytes(r) for r in self.members)
        gathered = self._gather_padded(payload, size)
        if gathered is None:
            return None
        rows = [np.zeros(m, dtype=np.int32) for m, _ in shapes]
        cols = [np.zeros(n, dtype=np.int32) for _, n in shapes]
        packed = [np.zeros((m * n + 7) // 8, dtype=np.uint8) for m, n in shapes]
        for member, buf in zip(self.members, gathered):
            offset = 0
            for p in range(len(shapes)):
                first, nrows, ncols, nbytes = self.geometry.payload_layout(p, member)
                if not nbytes:
                    continue
                rows[p][first : first + nrows] += buf[offset : offset + 4 * nrows].view(np.int32)
                offset += 4 * nrows
                cols[p] += buf[offset : offset + 4 * ncols].view(np.int32)
                offset += 4 * ncols
                start = self.geometry.ranges[p][member][0]
                packed[p][start // 8 : start // 8 + nbytes] |= buf[offset : offset + nbytes]
                offset += nbytes
        return rows, cols, packed

    def accept(self, snap: LocalSnapshot) -> None:
        """Make this snapshot's masks the previous ones (after it was stored)."""
        for state, packed in zip(self.states, snap.packed):
            if state.numel and state.offload is not None:
                state.offload.put_previous(packed.cpu().numpy())
            elif state.numel:
                state.previous_packed = packed

    def restore(self, codes: list[np.ndarray], refs: list[np.ndarray], previous: list[np.ndarray]) -> None:
        """Take W0 codes, reference masks and previous masks of this rank's ranges from a stored run (resume; held in memory)."""
        states = []
        for p, shard in enumerate(self.layout.shards):
            start, numel = self._range(p)
            device = self.base_device or self._device_of(p)
            states.append(
                ShardState(
                    shard=shard,
                    start=start,
                    numel=numel,
                    base_bits=torch.from_numpy(codes[p]).to(device),
                    reference_packed=torch.from_numpy(refs[p]).to(device),
                    previous_packed=torch.from_numpy(previous[p]).to(device),
                )
            )
        self.states = states

    def set_previous(self, local_packed: list[np.ndarray]) -> None:
        """Previous masks from this rank's aligned local packed masks (e.g. after a resume)."""
        for state, local in zip(self.states, local_packed):
            if state.offload is not None:
                state.offload.put_previous(np.ascontiguousarray(local))
            else:
                state.previous_packed = torch.from_numpy(np.ascontiguousarray(local)).to(state.base_bits.device)

    def close(self) -> None:
        """Free the spill file (if any); the probe measures nothing after this."""
        if self.spill is not None:
            self.spill.close()


class _PerMatrix(Sequence):
    """A read-only list whose item ``p`` is computed when asked (the store writer takes one matrix at a time)."""

    def __init__(self, length: int, item: Callable[[int], np.ndarray]) -> None:
        self._length, self._item = length, item

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, p: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= p < self._length:
            raise IndexError(p)
        return self._item(p)
