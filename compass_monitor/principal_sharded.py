"""The principal score of matrices split over ranks, bit-identical to the single-process score.

``M_princ`` (paper Sec. 4.2) needs the rank-k reconstruction of each whole base
matrix; under FSDP each rank holds a flat range. :class:`ShardedPrincipal`
computes, for this rank's ranges only, exactly the float64 score that
``principal.principal_scores`` gives for the whole matrix (the exactness
argument is in ``compass_monitor.principal``):

* the global ``max |a|`` of each matrix (one all-reduce, max) fixes its fixed-point grid;
* tall matrices (m >= n): rows cut between two ranks are completed with one
  all-reduce, and each rank projects the rows it holds;
* wide matrices: regrouped by column blocks with one all-to-all of their bf16
  codes, projected as rows of ``W^T``, and the scores sent back with another;
* the exact Gram parts are summed with one ``reduce`` per owner rank (upper
  triangles, 8 r^2 bytes per r x r Gram matrix); eigenvectors are computed
  round-robin, one rank per matrix, and shared bit-exactly with one all-reduce.

On one rank :meth:`ShardedPrincipal.scores` calls ``principal_scores`` on the
whole matrices directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .collectives import Comm
from .principal import gram_from_symmetric, gram_parts, principal_scores, project_rows, scale_exponent, top_basis
from .shard_geometry import Geometry

__all__ = ["ShardedPrincipal", "BATCH_BYTES"]

#: Upper bound on one batched collective buffer (Gram parts, eigenvectors).
BATCH_BYTES = 1 << 28


class ShardedPrincipal:
    """Principal scores of the ranges one rank holds (see the module doc).

    Args:
        comm: the monitor's collectives.
        geometry: every rank's ranges of every matrix.
        rank_k: k of the rank-k reconstruction (``MonitorConfig.principal_rank``).
    """

    def __init__(self, comm: Comm, geometry: Geometry, rank_k: int) -> None:
        self.comm = comm
        self.geometry = geometry
        self.rank_k = rank_k

    def scores(self, group: list[int], w0_list: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Float64 principal scores of this rank's ranges of the matrices ``group`` (1-D, global flat order).

        Bit-identical to ``principal.principal_scores`` of the whole matrix (a collective on several ranks).
        """
        k_cfg = self.rank_k
        if self.comm.world_size == 1:  # whole matrices: the same functions, without the exchanges
            return {p: principal_scores(w0_list[p].view(self.geometry.shapes[p]), k_cfg).reshape(-1) for p in group}
        P = len(self.geometry.shapes)
        out: dict[int, torch.Tensor] = {}
        tall, wide = [], []
        for p in group:
            w0 = w0_list[p]
            m, n = self.geometry.shapes[p]
            if m == 0 or n == 0 or k_cfg <= 0:
                out[p] = torch.zeros_like(w0, dtype=torch.float64)
            elif k_cfg >= min(m, n):
                out[p] = w0.double().abs()
            elif m >= n:
                tall.append(p)
            else:
                wide.append(p)
        # Rows of the oriented matrix a (W or W^T) that this rank holds whole, as float64.
        blocks: dict[int, tuple[int, torch.Tensor, int, int]] = {}  # p -> (first row of a, rows, first owned, owned count)
        blocks.update(self._tall_blocks(tall, w0_list))
        wide_plan, routes = self._wide_blocks(wide, w0_list)
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
            start, numel = self.geometry.ranges[p][self.comm.rank]
            if numel == 0:
                out[p] = torch.zeros(0, dtype=torch.float64, device=w0_list[p].device)
                continue
            score = project_rows(rows, first, bases[p].to(rows.device), rows_total=m).reshape(-1)
            lead = start - first * n
            out[p] = score[lead : lead + numel]
        if wide:
            scores_t = {}
            for p in wide:
                first, rows, _ = wide_plan[p]
                m, n = self.geometry.shapes[p]
                scores_t[p] = project_rows(rows, first, bases[p].to(rows.device), rows_total=n) if rows.shape[0] else torch.zeros((0, m), dtype=torch.float64)
            back = self._wide_return(wide, scores_t, w0_list, routes)
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
            start, numel = self.geometry.ranges[p][self.comm.rank]
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
            start, numel = self.geometry.ranges[p][self.comm.rank]
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

    def _wide_blocks(self, wide: list[int], w0_list: dict[int, torch.Tensor]) -> tuple[dict[int, tuple[int, torch.Tensor, Any]], Any]:
        """Column blocks of wide matrices (rows of a = W^T), regrouped with one all-to-all of bf16 codes.

        Returns the blocks and the routes (send permutation and receive layout per
        matrix) that :meth:`_wide_return` sends the scores back along.
        """
        W = self.comm.world_size
        plan: dict[int, tuple[int, torch.Tensor, Any]] = {}
        if not wide:
            return plan, ({}, {})
        send_parts: list[list[np.ndarray]] = [[] for _ in range(W)]
        recv_counts = [0] * W
        perm_of = {}
        recv_info = {}
        for p in wide:
            m, n = self.geometry.shapes[p]
            bounds = np.asarray(self._column_bounds(n))
            start, numel = self.geometry.ranges[p][self.comm.rank]
            codes = w0_list[p].to(torch.bfloat16).view(torch.int16).cpu().numpy()
            cols = (start + np.arange(numel, dtype=np.int64)) % n
            dest = np.searchsorted(bounds, cols, side="right") - 1
            perm = np.argsort(dest, kind="stable")
            split = np.bincount(dest, minlength=W)
            perm_of[p] = (perm, split)
            sorted_codes = codes[perm]
            offset = 0
            for d in range(W):
                send_parts[d].append(sorted_codes[offset : offset + split[d]])
                offset += split[d]
            # What this rank receives: its column block, row-major, grouped by source rank.
            c0, c1 = int(bounds[self.comm.rank]), int(bounds[self.comm.rank + 1])
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
        return plan, (perm_of, recv_info)

    def _wide_return(self, wide: list[int], scores_t: dict[int, torch.Tensor], w0_list: dict[int, torch.Tensor], routes: Any) -> dict[int, torch.Tensor]:
        """Send the column blocks' scores back to the ranks holding those elements (one all-to-all)."""
        perm_of, recv_info = routes
        W = self.comm.world_size
        send_parts: list[list[np.ndarray]] = [[] for _ in range(W)]
        for p in wide:
            m, n = self.geometry.shapes[p]
            order, per_source, c0, c1 = recv_info[p]
            block = scores_t[p].T.contiguous().reshape(-1).cpu().numpy()  # (m, cw) row-major
            grouped = block[order]
            offset = 0
            for r in range(W):
                send_parts[r].append(grouped[offset : offset + per_source[r]])
                offset += int(per_source[r])
        send_counts = [sum(x.size for x in send_parts[r]) for r in range(W)]
        recv_counts = [0] * W
        for p in wide:
            _, split = perm_of[p]
            for d in range(W):
                recv_counts[d] += int(split[d])
        send = np.concatenate([np.concatenate(send_parts[r]) for r in range(W)]).astype(np.float64)
        recv = self.comm.all_to_all(torch.from_numpy(send), send_counts, recv_counts).numpy()
        cursor = [sum(recv_counts[:d]) for d in range(W)]
        out = {}
        for p in wide:
            perm, split = perm_of[p]
            local = np.zeros(perm.size, dtype=np.float64)
            pieces = []
            for d in range(W):
                pieces.append(recv[cursor[d] : cursor[d] + split[d]])
                cursor[d] += int(split[d])
            local[perm] = np.concatenate(pieces) if pieces else np.zeros(0, np.float64)
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
        k_cfg = self.rank_k
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
                if o != self.comm.rank:
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
