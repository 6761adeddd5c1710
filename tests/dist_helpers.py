"""Helpers for the multi-process (gloo, CPU) tests of the sharded monitor.

``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` fresh processes with an initialized gloo process group and
returns each rank's return value. The training here is deterministic and
gives *bit-identical* weights on any number of ranks and in a single process:

* the same data on every rank; only rank 0's loss counts (the others are
  multiplied by 0), and FSDP's gradient division is switched off, so the
  reduce-scattered gradient is ``g + 0 + ... = g`` exactly;
* :class:`ExactAdam` uses only single-rounding elementwise ops (mul, add with
  alpha 1, div, sqrt), so a shard's update equals the same elements of the
  whole tensor's update (no fused multiply-add whose SIMD and scalar paths
  could round differently).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ExactAdam(torch.optim.Optimizer):
    """Adam with bias-free moments, in single-rounding elementwise ops on each rank's local shard."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), eps: float = 1e-8) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                w, g = _local(p), _local(p.grad)
                if not state:
                    state["m"] = torch.zeros_like(w)
                    state["v"] = torch.zeros_like(w)
                m = torch.add(torch.mul(state["m"], b1), torch.mul(g, 1 - b1))
                v = torch.add(torch.mul(state["v"], b2), torch.mul(torch.mul(g, g), 1 - b2))
                state["m"].copy_(m)
                state["v"].copy_(v)
                w.add_(torch.mul(torch.div(m, torch.add(torch.sqrt(v), group["eps"])), -group["lr"]))
        return None


def checkpoint_fsdp2(model: nn.Module, optimizer: ExactAdam) -> dict[str, tuple[torch.Tensor, ...]]:
    """Whole weights and Adam moments by parameter name (a test-side gather of an FSDP2 model)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        full = [p.full_tensor()]
        for key in ("m", "v"):
            full.append(DTensor.from_local(state[key], p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor())
        out[name] = tuple(t.detach().clone() for t in full)
    return out


def restore_fsdp2(model: nn.Module, optimizer: ExactAdam, ckpt: dict[str, tuple[torch.Tensor, ...]]) -> None:
    """Load a :func:`checkpoint_fsdp2` into an FSDP2 model sharded over any number of ranks."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with torch.no_grad():
        for name, p in model.named_parameters():
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            rows = slice(offset[0], offset[0] + shape[0])
            w, m, v = ckpt[name]
            p.to_local().copy_(w[rows])
            optimizer.state[p] = {"m": m[rows].clone(), "v": v[rows].clone()}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(13, 29)
        self.down_proj = nn.Linear(29, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.tanh(self.up_proj(x)))


class Net(nn.Module):
    """Row counts that do not divide by 2 or 3; a 2-row matrix (an empty shard on 3 ranks);
    tall and wide matrices; biases and a norm (1 x n)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        self.norm = nn.LayerNorm(13)
        self.q_proj = nn.Linear(13, 7, bias=False)
        self.squeeze = nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.norm(x + layer(x))
        return self.squeeze(torch.tanh(self.q_proj(x)))


def make_model(seed: int = 1234) -> Net:
    torch.manual_seed(seed)
    return Net()


def batches(steps: int, seed: int = 99) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 13, generator=g) for _ in range(steps)]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, data: list[torch.Tensor], *, rank: int = 0) -> None:
    for x in data:
        loss = model(x).sub(0.5).pow(2).mean()
        if rank != 0:
            loss = loss * 0.0  # only rank 0's gradient counts: the reduced gradient is exact
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def shard_fsdp2(model: nn.Module, *, mesh_shape: tuple[int, ...] | None = None) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if mesh_shape is None:
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # a plain sum: g + 0 + ... = g
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def shard_fsdp1(model: nn.Module, *, use_orig_params: bool, strategy: str = "FULL_SHARD") -> nn.Module:
    """FSDP1; ``strategy`` NO_SHARD (a replica per rank) or HYBRID_SHARD (a world x 1 mesh: replicas of one shard)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    extra = {}
    if strategy == "HYBRID_SHARD":
        from torch.distributed.device_mesh import init_device_mesh

        extra["device_mesh"] = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("replicate", "shard"))
    wrapped = FSDP(
        model,
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
        auto_wrap_policy=ModuleWrapPolicy({Block}),
        sharding_strategy=ShardingStrategy[strategy],
        **extra,
    )
    for module in wrapped.modules():
        if isinstance(module, FSDP):
            module._gradient_predivide_factor = 1
            module._gradient_postdivide_factor = 1
    return wrapped


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters by their unsharded names (a test-side gather)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._common_utils import clean_tensor_name
    from torch.distributed.tensor import DTensor

    if any(isinstance(m, FSDP) for m in model.modules()):
        with FSDP.summon_full_params(model, writeback=False):
            return {clean_tensor_name(n): p.detach().clone() for n, p in model.named_parameters()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- spawning


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as handle:
        pickle.dump(result, handle)
    try:
        dist.barrier()  # nobody tears the group down while another rank still talks
    finally:
        dist.destroy_process_group()


_PRELOAD = ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.tensor", "zarr", "numpy", "compass_monitor.monitor", "dist_helpers"]


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; each rank's return value.

    Ranks are forked from a fork server that imported torch once (a fresh
    process that ran no torch op and started no thread), so a group starts in
    well under a second instead of re-importing torch in every rank.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker, args=(world, _free_port(), out_dir, fn, args), nprocs=world, join=False, start_method="forkserver"
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:  # a hung collective must fail the test, not hang it
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise AssertionError(f"{getattr(fn, '__name__', fn)} on {world} ranks did not finish within {timeout:.0f} s")
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as handle:
                status, value = pickle.load(handle)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
    return results


# ----------------------------------------------------------------------------- in-process fake ranks


class ThreadComm:
    """The ``collectives.Comm`` interface for W ranks simulated by W threads of one process.

    Collectives meet at a barrier; sums are taken in rank order. Fast enough to
    check the sharded math on many random partitions (the multi-process tests
    check the real gloo collectives).
    """

    def __init__(self, hub: "ThreadHub", rank: int) -> None:
        self.hub, self.rank, self.world_size = hub, rank, hub.world_size
        self.device = torch.device("cpu")
        self.records: list = []
        self.phase = "setup"
        self.group = None

    def _exchange(self, value):
        hub = self.hub
        hub.slots[self.rank] = value
        hub.barrier.wait()
        values = list(hub.slots)
        hub.barrier.wait()
        return values

    def _note(self, op, tensor=None, nbytes=None):
        from compass_monitor.collectives import CommRecord

        size = nbytes if nbytes is not None else tensor.numel() * tensor.element_size()
        self.records.append(CommRecord(self.phase, op, str(tensor.dtype) if tensor is not None else "object", int(size)))

    def all_reduce(self, tensor, op="sum"):
        self._note(f"all_reduce_{op}", tensor)
        values = self._exchange(tensor.clone())
        out = values[0].clone()
        for v in values[1:]:
            out = out + v if op == "sum" else torch.maximum(out, v)
        tensor.copy_(out)
        return tensor

    def reduce(self, tensor, dst):
        self._note("reduce", tensor)
        values = self._exchange(tensor.clone())
        if self.rank == dst:
            out = values[0].clone()
            for v in values[1:]:
                out = out + v
            tensor.copy_(out)
        return tensor

    def gather(self, tensor, *, members, subgroup):
        self._note("gather", tensor)
        values = self._exchange(tensor.clone() if self.rank in members else None)
        return [values[r] for r in members] if self.rank == 0 else None

    def scatter(self, pieces, like):
        self._note("scatter", like)
        values = self._exchange(pieces)
        return values[0][self.rank].clone()

    def all_to_all(self, send, send_counts, recv_counts):
        self._note("all_to_all", send)
        values = self._exchange((send.clone(), list(send_counts)))
        parts = []
        for src, (buf, counts) in enumerate(values):
            offset = sum(counts[: self.rank])
            parts.append(buf[offset : offset + counts[self.rank]])
        return torch.cat(parts) if parts else send[:0].clone()

    def all_gather_object(self, obj):
        self._note("all_gather_object", None, 0)
        return self._exchange(obj)

    def new_subgroup(self, members):
        return None

    def bytes_in(self, phase):
        return sum(r.nbytes for r in self.records if r.phase == phase)

    def calls_in(self, phase):
        return [r for r in self.records if r.phase == phase]


class ThreadHub:
    def __init__(self, world_size: int) -> None:
        import threading

        self.world_size = world_size
        self.slots: list = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def run(self, fn: Callable[[ThreadComm], Any]) -> list[Any]:
        """``fn(comm)`` on every simulated rank in its own thread; the results by rank (re-raises the first error)."""
        import threading

        results: list[Any] = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def target(rank: int) -> None:
            try:
                results[rank] = fn(ThreadComm(self, rank))
            except BaseException as exc:  # noqa: BLE001
                errors[rank] = exc
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
        if first is None:
            first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results


# ----------------------------------------------------------------------------- counting collectives

_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast", "broadcast_object_list",
    "gather", "gather_object", "scatter", "scatter_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)


class CollectiveCounter:
    """Wraps every torch.distributed collective (in ``torch.distributed`` and ``distributed_c10d``)
    and records ``(name, dtype, bytes this rank sends)`` while :attr:`active`."""

    def __init__(self) -> None:
        self.active = False
        self.calls: list[tuple[str, str, int]] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        lists = [a for a in list(args) + list(kwargs.values()) if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
        if name in ("scatter",):
            sent = lists[0] if lists else []
            nbytes = sum(t.numel() * t.element_size() for t in sent)
            dtype = str(sent[0].dtype) if sent else str(tensors[0].dtype)
        elif tensors:
            # the input tensor: first positional for most; all_to_all_single(output, input, ...) sends the second
            t = tensors[1] if name == "all_to_all_single" and len(tensors) > 1 else tensors[0]
            nbytes, dtype = t.numel() * t.element_size(), str(t.dtype)
        else:
            nbytes, dtype = 0, "object"
        self.calls.append((name, dtype.replace("torch.", ""), nbytes))

    def __enter__(self) -> "CollectiveCounter":
        from torch.distributed import distributed_c10d

        for module in (dist, distributed_c10d):
            for name in _COLLECTIVES:
                original = getattr(module, name, None)
                if original is None:
                    continue

                def wrapper(*args, __name=name, __original=original, **kwargs):
                    if self.active:
                        self._record(__name, args, kwargs)
                    return __original(*args, **kwargs)

                self._saved.append((module, name, original))
                setattr(module, name, wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()
