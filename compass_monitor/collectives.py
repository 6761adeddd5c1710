"""The monitor's collectives on one process group, each call recorded (phase, op, dtype, bytes).

With one rank (or torch.distributed not initialized) every operation is the
identity and nothing is called: a plain model in one process is the trivial
case of the same code. Every method must be called on every rank of the group
in the same order; none is ever gated on a rank.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Comm", "CommRecord"]


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

    def __init__(self, group: Any = None, *, device: torch.device | None = None, local: bool = False) -> None:
        """``local``: this process alone, even in an initialized world (a model every rank holds whole)."""
        self.group = group
        try:
            import torch.distributed as dist

            self._dist = dist if not local and dist.is_available() and dist.is_initialized() else None
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
