"""The monitor's work on sharded parameters: each rank measures its own shard.

Every rank holds, per monitored parameter, a :class:`~compass_monitor.sharding.LocalShard`
(a contiguous range of the global row-major flat indices). The base, the
reference masks and every snapshot are computed on the local range only, and
combined with a few collectives that every rank runs in the same order (none is
ever gated on a rank). No collective on the per-snapshot path moves a weight.

Per snapshot (:meth:`ShardedCore.measure` / :meth:`ShardedCore.reduce` /
:meth:`ShardedCore.collect`), two collectives:

1. ``all_reduce`` (sum) of one int64 buffer: a few status flags (so that every
   rank agrees on skipping, failing, disabling) and the six counts of every
   matrix (``|M|``, the three overlaps, flips, non-finite); popcounts of the
   local ranges add up to the global counts. Every rank then holds the global
   counts (for loggers on any rank). ``(2 + 6 P) * 8`` bytes.
2. ``gather`` to rank 0 (the only writer), within the ranks that contribute
   anything, of one uint8 buffer per rank: per matrix, the int32 partial row
   counts of the rows the range touches, the int32 partial column counts
   (n), and the changed mask of the range packed 1 bit per weight, aligned to
   the global bytes it covers (leading bits of a shared byte are zero, so rank
   0 ORs the pieces). Rank 0 adds the row/column partials (a row split between
   two ranks, as FSDP1 flat shards do, is summed) and ORs the bytes: the global
   packed mask, rows and columns, exactly as a single process computes them.
   Gather needs equal sizes: each buffer is padded to the largest rank's
   (known to all from the geometry). About ``numel / 8 + 4 (rows + P n)``
   bytes per rank: 1/16 of the bf16 weights, 1/32 of fp32 master weights.

Rows could be gathered instead of reduced (with ``Shard(0)`` a row never
spans ranks) and are, together with the columns: rank 0 needs both only to
write them, so the gather moves each once; an all-reduce of the columns would
move ``2 (W-1)/W`` times as much to every rank. The store writes each mask
with a codec over the whole matrix (key frames + XOR deltas), so per-rank
chunk-aligned writes do not fit it: rank 0 writes, and the store's layout
does not depend on the number of ranks.

Once, for the base (:meth:`ShardedCore.capture_base`): the geometry (which
rank holds which range; checked to cover every matrix exactly once), the
bf16-exact principal score (``principal``: the exact fixed-point Gram parts of
the smaller side of each matrix are summed with one ``reduce`` to the rank that
computes its eigenvectors, upper triangles only, 8 r^2 bytes for an r x r Gram
matrix; eigenvectors are computed round-robin, one rank per matrix, and shared
bit-exactly with one all-reduce; each rank projects its own rows; matrices
wider than tall are regrouped by columns with one all-to-all of their bf16
codes and their scores sent back with another), an exact global top-count
selection (radix select on the float32 score bits: 4 all-reduces of
(selections x 256) histograms, then one all-reduce of per-rank tie counts so
that ties go to the lowest *global* flat index), one all-reduce of the
spacing-class counts, fingerprints (position-weighted sums with global
indices, mod p) and non-finite counts, and a gather of the packed reference
masks (3 bits per weight) and, if the store keeps W0, of the bf16 codes (2
bytes per weight, matrix by matrix) to rank 0.

Memory per rank: the base copy, 2 bytes per local weight, on the parameter's
device or in CPU memory (``base_device="cpu"``), plus half a bit per local
weight (three reference masks and the previous mask, packed). Rank 0 also
assembles each snapshot's whole packed masks in host memory (1 bit per weight
of the model, plus the gathered buffers), as a single-process monitor does.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .bf16 import ABS_MASK, INF_BITS, bf16_bits, canonical_bits, changed_from_bits
from .bitpack import pack_bits
from .config import MonitorConfig
from .matrix_probe import _FP_CHUNK, _FP_MOD, _FP_MULTIPLIERS, changed_np, counts_np, counts_torch
from .kernels import fused_available, fused_measure_range  # kernels (issue 17): the fused accelerator pass
from .precision_null import class_counts as _class_counts
from .precision_null import spacing_class
from .principal import gram_from_symmetric, gram_parts, project_rows, scale_exponent, top_basis
from .reference_masks import select_count
from .sharding import LocalShard, ShardingError, ShardLayout

__all__ = [
    "Comm",
    "CommRecord",
    "Geometry",
    "ShardState",
    "LocalSnapshot",
    "ShardedCore",
    "aligned_nbytes",
    "pack_aligned",
    "fingerprint_partial",
    "radix_select",
]

log = logging.getLogger(__name__)

#: Upper bound on one batched collective buffer at base time (Gram parts, eigenvectors).
BATCH_BYTES = 1 << 28
#: Local weights (the largest rank's) per group of matrices whose base is computed together.
BASE_GROUP_ELEMENTS = 1 << 26
_FLAG_FIELDS = ("error", "skip")


# ----------------------------------------------------------------------------- collectives


@dataclass(frozen=True)
class CommRecord:
    """One collective the monitor ran: what, in which phase, and the bytes this rank sent."""

    phase: str
    op: str
    dtype: str
    nbytes: int


class Comm:
    """The monitor's collectives on one process group, with a record of every call.

    With one rank (or torch.distributed not initialized) every operation is the
    identity and nothing is called.
    """

    def __init__(self, group: Any = None, *, device: torch.device | None = None) -> None:
        self.group = group
        try:
            import torch.distributed as dist

            self._dist = dist if dist.is_available() and dist.is_initialized() else None
        except ImportError:  # pragma: no cover
            self._dist = None
        if self._dist is None:
            self.rank, self.world_size = 0, 1
        else:
            self.rank, self.world_size = self._dist.get_rank(group), self._dist.get_world_size(group)
        if device is None:
            device = torch.device("cpu")
            if self._dist is not None and "nccl" in str(self._dist.get_backend(group)) and "gloo" not in str(self._dist.get_backend(group)):
                device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.records: list[CommRecord] = []
        self.phase = "setup"

    def _note(self, op: str, tensor: torch.Tensor | None, nbytes: int | None = None) -> None:
        size = nbytes if nbytes is not None else (tensor.numel() * tensor.element_size() if tensor is not None else 0)
        self.records.append(CommRecord(self.phase, op, str(tensor.dtype).replace("torch.", "") if tensor is not None else "object", int(size)))

    def bytes_in(self, phase: str) -> int:
        return sum(r.nbytes for r in self.records if r.phase == phase)

    def calls_in(self, phase: str) -> list[CommRecord]:
        return [r for r in self.records if r.phase == phase]

    def global_rank(self, group_rank: int) -> int:
        if self._dist is None or self.group is None:
            return group_rank
        return self._dist.get_global_rank(self.group, group_rank)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; returns ``tensor`` (moved to the collective device and back)."""
        self._note(f"all_reduce_{op}", tensor)
        if self.world_size == 1:
            return tensor
        work = tensor.to(self.device)
        reduce_op = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX}[op]
        self._dist.all_reduce(work, op=reduce_op, group=self.group)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def reduce(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum of every rank's ``tensor`` on group rank ``dst`` (in place there; other ranks' buffers are scratch)."""
        self._note("reduce", tensor)
        if self.world_size == 1:
            return tensor
        work = tensor.to(self.device)
        self._dist.reduce(work, dst=self.global_rank(dst), op=self._dist.ReduceOp.SUM, group=self.group)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def gather(self, tensor: torch.Tensor, *, members: Sequence[int], subgroup: Any) -> list[torch.Tensor] | None:
        """Equal-sized ``tensor`` of every member (group ranks) to group rank 0; None elsewhere."""
        self._note("gather", tensor)
        if self.world_size == 1:
            return [tensor]
        if self.rank not in members:
            return None
        work = tensor.to(self.device)
        out = [torch.empty_like(work) for _ in members] if self.rank == 0 else None
        group = subgroup if subgroup is not None else self.group
        self._dist.gather(work, out, dst=self.global_rank(0), group=group)
        return None if out is None else [t.cpu() for t in out]

    def scatter(self, pieces: list[torch.Tensor] | None, like: torch.Tensor) -> torch.Tensor:
        """Group rank 0's ``pieces[r]`` (equal sizes, like ``like``) to each rank r."""
        self._note("scatter", like if self.rank != 0 else torch.cat(pieces) if pieces else like)
        if self.world_size == 1:
            return pieces[0]
        out = torch.empty_like(like, device=self.device)
        scatter_list = [p.to(self.device) for p in pieces] if self.rank == 0 else None
        self._dist.scatter(out, scatter_list, src=self.global_rank(0), group=self.group)
        return out.cpu()

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """``all_to_all_single`` with uneven splits (1-D tensors)."""
        self._note("all_to_all", send)
        if self.world_size == 1:
            return send.clone()
        out = torch.empty(sum(recv_counts), dtype=send.dtype, device=self.device)
        self._dist.all_to_all_single(out, send.to(self.device), recv_counts, send_counts, group=self.group)
        return out.cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        self._note("all_gather_object", None, len(pickle.dumps(obj)))
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def new_subgroup(self, members: Sequence[int]) -> Any:
        """A process group of ``members`` (group ranks); every rank must call this. None: use the whole group."""
        if self.world_size == 1 or len(members) == self.world_size:
            return None
        return self._dist.new_group(ranks=[self.global_rank(r) for r in members], use_local_synchronization=False)


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Which rank contributes which flat range of every matrix (the same object on every rank).

    ``ranges[p][r] = (start, numel)`` of rank r's *contributed* elements of matrix
    p (numel 0 where rank r holds none or is a non-contributing replica).
    """

    ranges: list[list[tuple[int, int]]]
    shapes: list[tuple[int, int]]

    @property
    def world_size(self) -> int:
        return len(self.ranges[0]) if self.ranges else 1

    def members(self) -> list[int]:
        """Ranks that contribute something, and rank 0 (the writer)."""
        return sorted({0} | {r for per in self.ranges for r, (_, numel) in enumerate(per) if numel})

    def payload_layout(self, p: int, r: int) -> tuple[int, int, int, int]:
        """(first row, rows touched, columns sent, packed bytes) of rank r's snapshot piece of matrix p."""
        start, numel = self.ranges[p][r]
        if numel == 0:
            return 0, 0, 0, 0
        n = self.shapes[p][1]
        first, last = start // n, (start + numel - 1) // n
        return first, last - first + 1, n, aligned_nbytes(start, numel)

    def payload_bytes(self, r: int) -> int:
        total = 0
        for p in range(len(self.shapes)):
            _, rows, cols, nbytes = self.payload_layout(p, r)
            total += 4 * (rows + cols) + nbytes
        return total


def _check_geometry(per_rank: list[dict[str, Any]]) -> Geometry:
    """Build the geometry from every rank's report, or raise the same error on every rank."""
    errors = [(r, rep["error"], rep.get("error_type")) for r, rep in enumerate(per_rank) if rep.get("error")]
    if errors:
        rank, message, kind = errors[0]
        if kind == "SelectionError":
            from .selection import SelectionError

            raise SelectionError(message if len(per_rank) == 1 else f"rank {rank}: {message}")
        raise ShardingError(message if len(per_rank) == 1 else f"rank {rank}: {message}")
    names = per_rank[0]["names"]
    shapes = [tuple(s) for s in per_rank[0]["shapes"]]
    for r, rep in enumerate(per_rank[1:], start=1):
        if rep["names"] != names or [tuple(s) for s in rep["shapes"]] != shapes:
            differ = next((a, b) for a, b in zip(rep["names"] + [None], names + [None]) if a != b) if rep["names"] != names else None
            raise ShardingError(
                f"ranks select different parameters: rank {r} has {len(rep['names'])} ({differ[0] if differ else 'shapes differ'!s}), "
                f"rank 0 has {len(names)} ({differ[1] if differ else ''}); every rank must build the same model and configuration"
            )
    ranges: list[list[tuple[int, int]]] = []
    for p, (name, (m, n)) in enumerate(zip(names, shapes)):
        per = [tuple(rep["ranges"][p]) for rep in per_rank]
        covered = sorted((s, s + k, r) for r, (s, k) in enumerate(per) if k)
        position = 0
        for s, e, r in covered:
            if s != position:
                what = "overlap" if s < position else "leave a gap"
                raise ShardingError(
                    f"parameter {name!r}: the ranks' shards {what} at flat index {min(s, position)} of {m * n} "
                    f"(rank {r} holds [{s}, {e})); every element must be held by exactly one contributing rank"
                )
            position = e
        if position != m * n:
            raise ShardingError(f"parameter {name!r}: the ranks' shards cover {position} of its {m * n} elements")
        ranges.append([(int(s), int(k)) for s, k in per])
    return Geometry(ranges=ranges, shapes=shapes)


# ----------------------------------------------------------------------------- helpers


def aligned_nbytes(start: int, numel: int) -> int:
    """Bytes of the global packed mask that flat range [start, start + numel) touches."""
    if numel == 0:
        return 0
    return (start + numel + 7) // 8 - start // 8


def pack_aligned(mask: torch.Tensor | np.ndarray, start: int) -> np.ndarray | torch.Tensor:
    """Pack a 1-D bool mask of the range starting at ``start`` into the global bytes it covers.

    The first ``start % 8`` bits (another range's) and the trailing pad are zero, so
    the ranges of all ranks OR together into ``np.packbits`` of the whole mask.
    """
    lead = start % 8
    if isinstance(mask, np.ndarray):
        if mask.size == 0:
            return np.zeros(0, dtype=np.uint8)
        if lead:
            mask = np.concatenate([np.zeros(lead, dtype=bool), mask])
        return np.packbits(mask)
    if mask.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8, device=mask.device)
    if lead:
        mask = torch.cat([mask.new_zeros(lead), mask])
    return pack_bits(mask)


def fingerprint_partial(bits: torch.Tensor, start: int) -> torch.Tensor:
    """``matrix_probe.base_fingerprint`` terms of a flat range starting at global index ``start``, (2,) int64 mod p.

    The fingerprint of a whole matrix is the sum of its ranges' partials mod p.
    """
    flat = bits.reshape(-1)
    result = torch.zeros(len(_FP_MULTIPLIERS), dtype=torch.int64, device=flat.device)
    for offset in range(0, flat.numel(), _FP_CHUNK):
        chunk = flat[offset : offset + _FP_CHUNK].to(torch.int64) & 0xFFFF
        index = torch.arange(start + offset, start + offset + chunk.numel(), device=flat.device, dtype=torch.int64)
        for j, multiplier in enumerate(_FP_MULTIPLIERS):
            weight = (index * multiplier) % _FP_MOD + 1
            result[j] = (result[j] + ((chunk * weight) % _FP_MOD).sum()) % _FP_MOD
    return result


def _order_keys(score: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys of float32 values (no NaN; -0 and +0 equal)."""
    x = score.to(torch.float32) + 0.0  # -0 + 0 = +0
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return torch.where(bits >= (1 << 31), 0xFFFFFFFF - bits, bits | (1 << 31))


def radix_select(comm: Comm, scores: list[torch.Tensor], counts: list[int], starts: list[list[int]]) -> list[torch.Tensor]:
    """Exact global top-``count`` masks of scores spread over ranks; ties by lowest global flat index.

    Args:
        scores: per selection, this rank's float32 scores (1-D, in global flat
            order of its range; may be empty).
        counts: per selection, how many elements to select globally.
        starts: per selection, every rank's range start (``starts[s][r]``), to
            order ranks along the flat index.

    Returns the local bool masks: together, exactly ``reference_masks.top_count_mask``
    of the whole score. Collectives: 4 all-reduces of (S, 256) int64 histograms
    (8 bits of the 32-bit key per pass, most significant first) and one of the
    (W, S) per-rank tie counts.
    """
    S = len(scores)
    keys = [_order_keys(s.reshape(-1)) if s.numel() else None for s in scores]
    prefix = [0] * S
    need = list(counts)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros((S, 256), dtype=torch.int64)
        for i, k in enumerate(keys):
            if k is None or need[i] == 0:
                continue
            cand = k if shift == 24 else k[(k >> (shift + 8)) == prefix[i]]
            if cand.numel():
                hist[i] = torch.bincount(((cand >> shift) & 255), minlength=256).cpu()
        comm.all_reduce(hist)
        table = hist.numpy()
        for i in range(S):
            if need[i] == 0:
                continue
            above = 0
            for b in range(255, -1, -1):
                if above + table[i, b] >= need[i]:
                    break
                above += int(table[i, b])
            else:  # pragma: no cover - counts exceed the elements: a caller bug
                raise ValueError(f"selection {i}: cannot select {counts[i]} elements")
            need[i] -= above
            prefix[i] = (prefix[i] << 8) | b
    ties = torch.zeros((comm.world_size, S), dtype=torch.int64)
    local_eq: list[torch.Tensor | None] = []
    for i, k in enumerate(keys):
        if k is None or counts[i] == 0:
            local_eq.append(None)
            continue
        eq = k == prefix[i]
        ties[comm.rank, i] = int(eq.sum())
        local_eq.append(eq)
    comm.all_reduce(ties)
    masks = []
    for i, k in enumerate(keys):
        if k is None:
            masks.append(torch.zeros(scores[i].numel(), dtype=torch.bool, device=scores[i].device))
            continue
        if counts[i] == 0:
            masks.append(torch.zeros(k.numel(), dtype=torch.bool, device=k.device))
            continue
        mine = starts[i][comm.rank]
        before = sum(int(ties[r, i]) for r in range(comm.world_size) if r != comm.rank and starts[i][r] < mine)
        take = max(0, min(int(ties[comm.rank, i]), need[i] - before))
        eq = local_eq[i]
        mask = k > prefix[i]
        if take:
            mask |= eq & (torch.cumsum(eq.to(torch.int64), 0) <= take)
        masks.append(mask)
    return masks


# ----------------------------------------------------------------------------- state


@dataclass
class ShardState:
    """What a rank keeps per matrix: 2 bytes per local weight plus 4 bits of packed masks.

    All masks are packed over the global bytes the range touches (``pack_aligned``).
    """

    shard: LocalShard
    start: int  # contributed range (numel 0 on a non-contributing replica)
    numel: int
    base_bits: torch.Tensor  # (numel,) int16, canonical bf16 codes of W0, on the base device
    reference_packed: torch.Tensor  # (3, nbytes) uint8
    previous_packed: torch.Tensor  # (nbytes,) uint8


@dataclass
class LocalSnapshot:
    """One rank's measurement of every matrix (host arrays), before the collectives."""

    counts: np.ndarray  # (P, 6) int64
    payload: np.ndarray  # uint8, this rank's gather buffer (unpadded)
    packed: list[torch.Tensor] = field(default_factory=list)  # per matrix, for the previous-mask update
    error: str | None = None


def _as_numpy_bits(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy() if t.device.type != "cpu" else t.numpy()


# ----------------------------------------------------------------------------- the core


class ShardedCore:
    """Base capture and per-snapshot measurement of one rank's shards (see the module doc).

    Every public method that runs a collective must be called on every rank of
    the group in the same order.

    Args:
        layout: this rank's shards (``sharding.discover_shards``).
        config: the monitor configuration (principal rank, alpha, ...).
        base_device: ``None`` keeps W0 on each parameter's device, ``"cpu"`` in host memory.
    """

    def __init__(
        self,
        layout: ShardLayout | None,
        config: MonitorConfig,
        *,
        base_device: str | torch.device | None = None,
        comm: Comm | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.config = config
        self.comm = comm or Comm(layout.group if layout is not None else None)
        self.base_device = None if base_device in (None, "param") else torch.device(base_device)
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
        self.geometry = _check_geometry(self.comm.all_gather_object(report))
        assert layout is not None
        self.layout = layout
        self.members = self.geometry.members()
        self.subgroup = self.comm.new_subgroup(self.members)
        self.states: list[ShardState] = []
        #: measurement code path: ``auto`` (numpy when W0 is in CPU memory, torch ops on its device otherwise)
        self.backend = "auto"

    @classmethod
    def from_model(cls, model: Any, config: MonitorConfig, *, group: Any = None, base_device: str | None = None) -> "ShardedCore":
        """Discover this rank's shards of ``model`` and agree on the geometry with every rank (a collective)."""
        from .selection import SelectionError
        from .sharding import discover_shards

        comm = Comm(group)
        try:
            layout, error = discover_shards(model, config, group=group), None
        except (ShardingError, SelectionError) as exc:
            layout, error = None, exc
        return cls(layout, config, base_device=base_device, comm=comm, error=error)

    # -- facts ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def is_writer(self) -> bool:
        return self.comm.rank == 0

    @property
    def specs(self):
        return self.layout.specs

    def _range(self, p: int) -> tuple[int, int]:
        return self.geometry.ranges[p][self.rank]

    def _starts(self, p: int) -> list[int]:
        return [s if k else -1 for s, k in self.geometry.ranges[p]]

    # -- base ---------------------------------------------------------------------------
    @torch.no_grad()
    def capture_base(self, *, want_codes: bool = False) -> dict[str, Any]:
        """Take W0 of every local range and compute the reference masks in global coordinates.

        Returns, on every rank, ``class_counts`` (P, 4, 512), ``fingerprints``
        (P, 2), ``nonfinite`` (P,) (global, int64 numpy); on rank 0 also
        ``reference_packed`` (per matrix, (3, nbytes) uint8 of the whole matrix)
        and, with ``want_codes``, ``base_codes`` (per matrix, (m*n,) int16).
        """
        self.comm.phase = "base"
        cfg = self.config
        P = len(self.layout.shards)
        reduce_buf = torch.zeros(P * (4 * 512 + 2 + 1), dtype=torch.int64)
        class_block = reduce_buf[: P * 4 * 512].view(P, 4, 512)
        fp_block = reduce_buf[P * 4 * 512 : P * (4 * 512 + 2)].view(P, 2)
        bad_block = reduce_buf[P * (4 * 512 + 2) :]
        states: list[ShardState | None] = [None] * P
        for group in self._base_groups():
            bits_of: dict[int, torch.Tensor] = {}
            w0_of: dict[int, torch.Tensor] = {}
            for p in group:
                shard = self.layout.shards[p]
                start, numel = self._range(p)
                if numel:
                    bits = canonical_bits(bf16_bits(shard.local()).clone())
                else:
                    device = shard.values().device if shard.numel else torch.device("cpu")
                    bits = torch.zeros(0, dtype=torch.int16, device=device)
                bits_of[p] = bits
                w0_of[p] = torch.nan_to_num(bits.view(torch.bfloat16).float(), nan=0.0, posinf=0.0, neginf=0.0)
            principal_scores = self._principal_scores(group, w0_of)
            scores, counts, starts = [], [], []
            for p in group:
                count = select_count(self.layout.shards[p].spec.numel, cfg.alpha)
                scores += [principal_scores.pop(p), -w0_of[p].abs()]
                counts += [count, count]
                starts += [self._starts(p), self._starts(p)]
            del w0_of, principal_scores
            masks = radix_select(self.comm, scores, counts, starts)
            del scores
            for j, p in enumerate(group):
                shard = self.layout.shards[p]
                start, numel = self._range(p)
                bits = bits_of[p]
                principal, low = masks[2 * j], masks[2 * j + 1]
                pnl = principal & ~low
                if numel:
                    class_block[p] = _class_counts(spacing_class(bits), [principal, low, pnl]).cpu()
                    fp_block[p] = fingerprint_partial(bits, start).cpu()
                    bad_block[p] = int(((bits & ABS_MASK) >= INF_BITS).sum())
                    reference = torch.stack([pack_aligned(principal, start), pack_aligned(low, start), pack_aligned(pnl, start)])
                else:
                    reference = torch.zeros((3, 0), dtype=torch.uint8, device=bits.device)
                base = bits if self.base_device is None else bits.to(self.base_device)
                ref = reference if self.base_device is None else reference.to(self.base_device)
                states[p] = ShardState(shard=shard, start=start, numel=numel, base_bits=base, reference_packed=ref, previous_packed=torch.zeros_like(ref[0]))
            del masks
        self.states = [s for s in states if s is not None]
        self.comm.all_reduce(reduce_buf)
        fingerprints = fp_block.numpy() % _FP_MOD
        result: dict[str, Any] = {
            "class_counts": class_block.numpy().copy(),
            "fingerprints": fingerprints.copy(),
            "nonfinite": bad_block.numpy().copy(),
        }
        result["reference_packed"] = self._gather_reference()
        if want_codes:
            result["base_codes"] = self.gather_base_codes()
        self.comm.phase = "idle"
        return result

    def _gather_reference(self) -> list[np.ndarray] | None:
        """The whole reference masks of every matrix on rank 0 (3 bits per weight, one gather)."""
        P = len(self.states)
        pieces = [s.reference_packed.cpu().numpy().reshape(-1) for s in self.states]
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
        out: list[np.ndarray] | None = [] if self.is_writer else None
        for p, state in enumerate(self.states):
            codes = self._gather_codes(p, state.base_bits.cpu().numpy())
            if out is not None and codes is not None:
                out.append(codes)
        return out

    def gather_matrix(self, p: int, *, base: bool) -> np.ndarray | None:
        """Matrix ``p``'s whole (m * n,) int16 bf16 codes on rank 0 (None elsewhere): W0 or the current weights.

        A gather of the matrix to rank 0, 2 bytes per weight in all: only for the
        spectral diagnostics, at their own cadence (the masks never need it).
        """
        state = self.states[p]
        if base:
            mine = state.base_bits.cpu().numpy()
        elif state.numel:
            mine = bf16_bits(state.shard.local()).cpu().numpy()
        else:
            mine = np.zeros(0, dtype=np.int16)
        return self._gather_codes(p, mine)

    def _gather_codes(self, p: int, mine: np.ndarray) -> np.ndarray | None:
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

    # -- principal scores ------------------------------------------------------------
    def _base_groups(self) -> list[list[int]]:
        """Consecutive matrices whose largest local range (over ranks) sums to at most ``BASE_GROUP_ELEMENTS``.

        The base is computed group by group (about 30 bytes of temporaries per
        local weight of a group); the grouping comes from the geometry, so it is
        the same on every rank.
        """
        groups: list[list[int]] = []
        size = 0
        for p, per_rank in enumerate(self.geometry.ranges):
            biggest = max(k for _, k in per_rank)
            if groups and groups[-1] and size + biggest <= BASE_GROUP_ELEMENTS:
                groups[-1].append(p)
                size += biggest
            else:
                groups.append([p])
                size = biggest
        return groups

    def _principal_scores(self, group: list[int], w0_list: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Float32 principal scores of the local ranges of ``group``, bit-identical to ``principal.principal_scores``."""
        k_cfg = self.config.principal_rank
        P = len(self.geometry.shapes)
        out: dict[int, torch.Tensor] = {}
        tall, wide = [], []
        for p in group:
            w0 = w0_list[p]
            m, n = self.geometry.shapes[p]
            if m == 0 or n == 0 or k_cfg <= 0:
                out[p] = torch.zeros_like(w0)
            elif k_cfg >= min(m, n):
                out[p] = w0.abs()
            elif m >= n:
                tall.append(p)
            else:
                wide.append(p)
        # Rows of the oriented matrix a (W or W^T) that this rank holds whole, as float64.
        blocks: dict[int, tuple[int, torch.Tensor, int, int]] = {}  # p -> (first row of a, rows, first owned, owned count)
        blocks.update(self._tall_blocks(tall, w0_list))
        wide_plan = self._wide_blocks(wide, w0_list)
        for p, (first, rows, _) in wide_plan.items():
            blocks[p] = (first, rows, first, rows.shape[0])
        projected = tall + wide
        # The global max |a| of each matrix fixes its fixed-point grid.
        maxima = torch.zeros(P, dtype=torch.float64)
        for p in projected:
            if w0_list[p].numel():
                maxima[p] = float(w0_list[p].abs().max())
        self.comm.all_reduce(maxima, op="max")
        bases = self._bases(projected, blocks, maxima)
        for p in tall:
            first, rows, _, _ = blocks[p]
            m, n = self.geometry.shapes[p]
            start, numel = self._range(p)
            if numel == 0:
                out[p] = torch.zeros(0, dtype=torch.float32, device=w0_list[p].device)
                continue
            score = project_rows(rows, first, bases[p].to(rows.device), rows_total=m).reshape(-1)
            lead = start - first * n
            out[p] = score[lead : lead + numel]
        if wide:
            scores_t = {}
            for p in wide:
                first, rows, _ = wide_plan[p]
                m, n = self.geometry.shapes[p]
                scores_t[p] = project_rows(rows, first, bases[p].to(rows.device), rows_total=n) if rows.shape[0] else torch.zeros((0, m), dtype=torch.float32)
            back = self._wide_return(wide, scores_t, w0_list)
            for p in wide:
                out[p] = back[p]
        return out

    def _tall_blocks(self, tall: list[int], w0_list: dict[int, torch.Tensor]) -> dict[int, tuple[int, torch.Tensor, int, int]]:
        """Whole rows for tall matrices: local rows, plus rows split with another rank (one all-reduce)."""
        blocks = {}
        cut_rows: dict[int, list[int]] = {}
        for p in tall:
            m, n = self.geometry.shapes[p]
            cuts = set()
            for s, k in self.geometry.ranges[p]:
                for b in (s, s + k):
                    if k and b % n:
                        cuts.add(b // n)
            cut_rows[p] = sorted(cuts)
        total = sum(len(cut_rows[p]) * self.geometry.shapes[p][1] for p in tall)
        exchange = torch.zeros(total, dtype=torch.float32)
        offset = 0
        offsets = {}
        for p in tall:
            m, n = self.geometry.shapes[p]
            start, numel = self._range(p)
            offsets[p] = offset
            for row in cut_rows[p]:
                lo, hi = max(row * n, start), min((row + 1) * n, start + numel)
                if hi > lo:
                    exchange[offset + lo - row * n : offset + hi - row * n] = w0_list[p][lo - start : hi - start].cpu()
                offset += n
        if total:
            self.comm.all_reduce(exchange)
        for p in tall:
            m, n = self.geometry.shapes[p]
            start, numel = self._range(p)
            w0 = w0_list[p]
            if numel == 0:
                blocks[p] = (0, torch.zeros((0, n), dtype=torch.float64, device=w0.device), 0, 0)
                continue
            first, last = start // n, (start + numel - 1) // n
            rows = torch.zeros(((last - first + 1) * n,), dtype=torch.float64, device=w0.device)
            lead = start - first * n
            rows[lead : lead + numel] = w0.double()
            rows = rows.view(-1, n)
            for j, row in enumerate(cut_rows[p]):
                if first <= row <= last:
                    rows[row - first] = exchange[offsets[p] + j * n : offsets[p] + (j + 1) * n].to(rows.device, torch.float64)
            owned_first = (start + n - 1) // n  # rows whose first element lies in [start, end)
            owned_last = (start + numel - 1) // n
            owned = max(0, owned_last - owned_first + 1)
            blocks[p] = (first, rows, owned_first, owned)
        return blocks

    def _column_bounds(self, n: int) -> list[int]:
        W = self.comm.world_size
        return [(n * d) // W for d in range(W + 1)]

    def _wide_blocks(self, wide: list[int], w0_list: dict[int, torch.Tensor]) -> dict[int, tuple[int, torch.Tensor, Any]]:
        """Column blocks of wide matrices (rows of a = W^T), regrouped with one all-to-all of bf16 codes."""
        W = self.comm.world_size
        plan: dict[int, tuple[int, torch.Tensor, Any]] = {}
        if not wide:
            return plan
        send_parts: list[list[np.ndarray]] = [[] for _ in range(W)]
        recv_counts = [0] * W
        self._wide_perm = {}
        recv_info = {}
        for p in wide:
            m, n = self.geometry.shapes[p]
            bounds = np.asarray(self._column_bounds(n))
            start, numel = self._range(p)
            codes = w0_list[p].to(torch.bfloat16).view(torch.int16).cpu().numpy()
            cols = (start + np.arange(numel, dtype=np.int64)) % n
            dest = np.searchsorted(bounds, cols, side="right") - 1
            perm = np.argsort(dest, kind="stable")
            split = np.bincount(dest, minlength=W)
            self._wide_perm[p] = (perm, split)
            sorted_codes = codes[perm]
            offset = 0
            for d in range(W):
                send_parts[d].append(sorted_codes[offset : offset + split[d]])
                offset += split[d]
            # What this rank receives: its column block, row-major, grouped by source rank.
            c0, c1 = int(bounds[self.rank]), int(bounds[self.rank + 1])
            g = (np.arange(m, dtype=np.int64)[:, None] * n + np.arange(c0, c1, dtype=np.int64)[None, :]).reshape(-1)
            sources = sorted((s, s + k, r) for r, (s, k) in enumerate(self.geometry.ranges[p]) if k)
            src_starts = np.asarray([s for s, _, _ in sources], dtype=np.int64)
            src_rank = np.asarray([r for _, _, r in sources], dtype=np.int64)
            owner = src_rank[np.searchsorted(src_starts, g, side="right") - 1] if g.size else np.zeros(0, dtype=np.int64)
            order = np.argsort(owner, kind="stable")
            per_source = np.bincount(owner, minlength=W)
            recv_info[p] = (order, per_source, c0, c1)
            for r in range(W):
                recv_counts[r] += int(per_source[r])
        send_counts = [sum(part.size for part in send_parts[d]) for d in range(W)]
        send = np.concatenate([np.concatenate(send_parts[d]) if send_parts[d] else np.zeros(0, np.int16) for d in range(W)]).astype(np.int16)
        recv = self.comm.all_to_all(torch.from_numpy(send.view(np.uint8).copy()), [2 * c for c in send_counts], [2 * c for c in recv_counts])
        recv_codes = recv.numpy().view(np.int16)
        # Received buffer: [from rank 0: p1, p2, ...][from rank 1: ...]
        cursor = [sum(recv_counts[:r]) for r in range(W)]
        self._wide_recv = recv_info
        for p in wide:
            m, n = self.geometry.shapes[p]
            order, per_source, c0, c1 = recv_info[p]
            block = np.zeros(m * (c1 - c0), dtype=np.int16)
            pieces = []
            for r in range(W):
                pieces.append(recv_codes[cursor[r] : cursor[r] + per_source[r]])
                cursor[r] += int(per_source[r])
            block[order] = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
            values = torch.from_numpy(block).view(torch.bfloat16).to(torch.float64).view(m, c1 - c0)
            values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
            device = w0_list[p].device
            plan[p] = (c0, values.T.contiguous().to(device), None)
        return plan

    def _wide_return(self, wide: list[int], scores_t: dict[int, torch.Tensor], w0_list: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Send the column blocks' scores back to the ranks holding those elements (one all-to-all)."""
        W = self.comm.world_size
        send_parts: list[list[np.ndarray]] = [[] for _ in range(W)]
        for p in wide:
            m, n = self.geometry.shapes[p]
            order, per_source, c0, c1 = self._wide_recv[p]
            block = scores_t[p].T.contiguous().reshape(-1).cpu().numpy()  # (m, cw) row-major
            grouped = block[order]
            offset = 0
            for r in range(W):
                send_parts[r].append(grouped[offset : offset + per_source[r]])
                offset += int(per_source[r])
        send_counts = [sum(x.size for x in send_parts[r]) for r in range(W)]
        recv_counts = [0] * W
        for p in wide:
            _, split = self._wide_perm[p]
            for d in range(W):
                recv_counts[d] += int(split[d])
        send = np.concatenate([np.concatenate(send_parts[r]) for r in range(W)]).astype(np.float32)
        recv = self.comm.all_to_all(torch.from_numpy(send), send_counts, recv_counts).numpy()
        cursor = [sum(recv_counts[:d]) for d in range(W)]
        out = {}
        for p in wide:
            perm, split = self._wide_perm[p]
            local = np.zeros(perm.size, dtype=np.float32)
            pieces = []
            for d in range(W):
                pieces.append(recv[cursor[d] : cursor[d] + split[d]])
                cursor[d] += int(split[d])
            local[perm] = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
            out[p] = torch.from_numpy(local).to(w0_list[p].device)
        return out

    def _bases(self, projected: list[int], blocks: dict[int, tuple[int, torch.Tensor, int, int]], maxima: torch.Tensor) -> dict[int, torch.Tensor]:
        """Top-k eigenvectors of every projected matrix's exact Gram matrix, identical on every rank.

        Matrix i's eigenvectors are computed on rank i mod W. Per batch (bounded
        by ``BATCH_BYTES``): for each owner, one ``reduce`` to it of the upper
        triangles of the exact parts ``H`` and ``S = X + X^T`` of its matrices
        (8 r^2 bytes per r x r Gram matrix); then one all-reduce shares every
        owner's eigenvectors bit-exactly (their float64 bits viewed as int64;
        the other ranks add zeros).
        """
        k_cfg = self.config.principal_rank
        W = self.comm.world_size
        bases: dict[int, torch.Tensor] = {}
        owner = {p: i % W for i, p in enumerate(projected)}
        triangles: dict[int, torch.Tensor] = {}

        def upper(r: int) -> torch.Tensor:
            """Bool mask of the upper triangle (boolean indexing reads it row by row)."""
            if r not in triangles:
                triangles[r] = torch.ones((r, r), dtype=torch.bool).triu_()
            return triangles[r]

        def flush(batch: list[int]) -> None:
            if not batch:
                return
            grams: dict[int, torch.Tensor] = {}
            for o in range(W):
                mine = [p for p in batch if owner[p] == o]
                if not mine:
                    continue
                sizes = [min(self.geometry.shapes[p]) for p in mine]
                segment = torch.zeros(sum(r * (r + 1) for r in sizes), dtype=torch.float64)
                offset = 0
                for p, r in zip(mine, sizes):
                    first, rows, owned_first, owned = blocks[p]
                    tri = r * (r + 1) // 2
                    if owned:
                        sub = rows[owned_first - first : owned_first - first + owned]
                        hh, hl = gram_parts(sub, max_exponent=scale_exponent(float(maxima[p])), rows_total=max(self.geometry.shapes[p]))
                        mask = upper(r)
                        segment[offset : offset + tri] = hh.cpu()[mask]
                        segment[offset + tri : offset + 2 * tri] = (hl + hl.T).cpu()[mask]
                    offset += 2 * tri
                self.comm.reduce(segment, o)
                if o != self.rank:
                    continue
                offset = 0
                for p, r in zip(mine, sizes):
                    tri = r * (r + 1) // 2
                    mask = upper(r)
                    parts = []
                    for j in range(2):
                        half = torch.zeros((r, r), dtype=torch.float64)
                        half[mask] = segment[offset + j * tri : offset + (j + 1) * tri]
                        parts.append(torch.where(mask, half, half.T))  # mirror: no arithmetic, exact
                    grams[p] = gram_from_symmetric(parts[0], parts[1], rows_total=max(self.geometry.shapes[p]))
                    offset += 2 * tri
            dims = [min(self.geometry.shapes[p]) for p in batch]
            vec_sizes = [r * min(k_cfg, r) for r in dims]
            shared = torch.zeros(sum(vec_sizes), dtype=torch.int64)
            v_offset = 0
            for p, size in zip(batch, vec_sizes):
                if p in grams:
                    basis = top_basis(grams.pop(p), min(k_cfg, min(self.geometry.shapes[p])))
                    shared[v_offset : v_offset + size] = basis.reshape(-1).view(torch.int64)
                v_offset += size
            self.comm.all_reduce(shared)
            v_offset = 0
            for p, r, size in zip(batch, dims, vec_sizes):
                bases[p] = shared[v_offset : v_offset + size].clone().view(torch.float64).view(r, min(k_cfg, r))
                v_offset += size

        batch: list[int] = []
        size = 0
        for p in projected:
            r = min(self.geometry.shapes[p])
            need = 8 * r * (r + 1)
            if batch and size + need > BATCH_BYTES:
                flush(batch)
                batch, size = [], 0
            batch.append(p)
            size += need
        flush(batch)
        return bases

    # -- snapshots ---------------------------------------------------------------------
    @torch.no_grad()
    def measure(self) -> LocalSnapshot:
        """Measure every local range (no collective). A failure is reported in ``error``, not raised."""
        P = len(self.states)
        counts = np.zeros((P, 6), dtype=np.int64)
        pieces: list[np.ndarray] = []
        packed_list: list[torch.Tensor] = []
        on_device: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        try:
            for p, state in enumerate(self.states):
                if state.numel == 0:
                    packed_list.append(state.previous_packed)
                    continue
                c, rows, cols, packed = _measure_range(state, self.geometry.shapes[p], backend=self.backend)
                packed_list.append(packed)
                if isinstance(c, torch.Tensor):  # accelerator: copied to the host below, once per kind
                    on_device.append((p, c, rows, cols, packed))
                    continue
                counts[p] = c
                pieces += [rows.view(np.uint8), cols.view(np.uint8), _as_numpy_bits(packed)]
            if on_device:
                host = [torch.cat([t[k].reshape(-1).view(torch.uint8) for t in on_device]).cpu().numpy() for k in (1, 2, 3, 4)]
                offsets = [0, 0, 0, 0]
                for p, c, rows, cols, packed in on_device:
                    chunk = []
                    for k, t in enumerate((c, rows, cols, packed)):
                        size = t.numel() * t.element_size()
                        chunk.append(host[k][offsets[k] : offsets[k] + size])
                        offsets[k] += size
                    counts[p] = chunk[0].view(np.int64)
                    pieces += chunk[1:]
        except Exception as exc:  # reported to every rank through the next all-reduce
            return LocalSnapshot(counts=np.zeros((P, 6), dtype=np.int64), payload=np.zeros(0, np.uint8), error=f"rank {self.rank}: {type(exc).__name__}: {exc}")
        payload = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
        return LocalSnapshot(counts=counts, payload=payload, packed=packed_list)

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
        size = max(self.geometry.payload_bytes(r) for r in self.members)
        gathered = self._gather_padded(snap.payload, size)
        if gathered is None:
            return None
        rows = [np.zeros(m, dtype=np.int32) for m, _ in self.geometry.shapes]
        cols = [np.zeros(n, dtype=np.int32) for _, n in self.geometry.shapes]
        packed = [np.zeros((m * n + 7) // 8, dtype=np.uint8) for m, n in self.geometry.shapes]
        for member, buf in zip(self.members, gathered):
            offset = 0
            for p in range(len(self.geometry.shapes)):
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
            if state.numel:
                state.previous_packed = packed

    def set_previous(self, packed_global: list[np.ndarray] | None) -> None:
        """Previous masks from whole packed masks (every rank passes the same list), e.g. after a resume."""
        for p, state in enumerate(self.states):
            if not state.numel or packed_global is None:
                continue
            bits = np.unpackbits(packed_global[p], count=self.geometry.shapes[p][0] * self.geometry.shapes[p][1])
            local = pack_aligned(bits[state.start : state.start + state.numel].astype(bool), state.start)
            state.previous_packed = torch.from_numpy(np.ascontiguousarray(local)).to(state.base_bits.device)


def _measure_range(state: ShardState, shape: tuple[int, int], *, backend: str = "auto") -> tuple[Any, Any, Any, torch.Tensor]:
    """Counts (6,) int64, partial rows (touched rows) and columns int32, aligned packed mask of one local range.

    numpy on host arrays when the base is in CPU memory (``backend="auto"``); torch
    tensors on the base's device otherwise (the caller copies them to the host in one go).
    """
    # kernels (issue 17): on CUDA with triton, one fused pass with the torch branch's outputs.
    if backend == "auto" and fused_available(state.base_bits.device):
        return fused_measure_range(state, shape)
    m, n = shape
    start, numel = state.start, state.numel
    values = state.shard.local()
    current_t = bf16_bits(values)
    base_t = state.base_bits
    if current_t.device != base_t.device:
        current_t = current_t.to(base_t.device)
    first, last = start // n, (start + numel - 1) // n
    nrows = last - first + 1
    lead = start - first * n
    if backend == "numpy" or (backend == "auto" and base_t.device.type == "cpu"):
        changed, nonfinite = changed_np(current_t.numpy(), base_t.numpy())
        packed = pack_aligned(changed, start)
        counts = counts_np(packed, state.reference_packed.numpy(), state.previous_packed.numpy(), nonfinite)
        if lead == 0 and numel == nrows * n:
            grid = changed.reshape(nrows, n)
        else:
            grid = np.zeros(nrows * n, dtype=bool)
            grid[lead : lead + numel] = changed
            grid = grid.reshape(nrows, n)
        return counts, grid.sum(axis=1, dtype=np.int32), grid.sum(axis=0, dtype=np.int32), torch.from_numpy(packed)
    changed = changed_from_bits(current_t, base_t)
    packed_t = pack_aligned(changed, start)
    counts_t = counts_torch(packed_t, state.reference_packed, state.previous_packed, current_t)
    if lead == 0 and numel == nrows * n:
        grid = changed.view(nrows, n)
    else:
        grid = torch.zeros(nrows * n, dtype=torch.bool, device=changed.device)
        grid[lead : lead + numel] = changed
        grid = grid.view(nrows, n)
    return counts_t, grid.sum(dim=1, dtype=torch.int32), grid.sum(dim=0, dtype=torch.int32), packed_t
