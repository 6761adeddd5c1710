"""Shard geometry: which rank contributes which flat range of each matrix, and aligned bit packing.

A rank's part of a matrix is a contiguous range ``[start, start + numel)`` of
its global row-major flat indices (``sharding.LocalShard``). Masks of a range
are packed over the global bytes the range touches (:func:`pack_aligned`):
leading bits of a byte shared with another range are zero, so the ranges of
all ranks OR together into ``np.packbits`` of the whole mask, and a range that
starts at 0 packs exactly as ``np.packbits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .bitpack import pack_bits
from .sharding import ShardingError

__all__ = ["Geometry", "check_geometry", "aligned_nbytes", "pack_aligned", "slice_aligned", "clear_outside"]


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


def check_geometry(per_rank: list[dict[str, Any]]) -> Geometry:
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


def clear_outside(local: np.ndarray, start: int, numel: int) -> np.ndarray:
    """Zero the bits of an aligned local packed mask that lie outside [start, start + numel) (in place)."""
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
    return clear_outside(out, start, numel)
