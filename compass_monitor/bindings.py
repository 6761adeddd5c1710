"""Is every monitored matrix still read from the tensor the model computes with? Checked at each snapshot.

The probe reads each matrix through the parameter object that selection found
when the base was taken (``LocalShard.source``). Training code can swap it
under the monitor:

* ``param.data = x`` or ``model.to(...)``: the same Parameter object, new storage;
* a replaced module (layer surgery, ``model.layers[0].mlp = ...``) or
  ``load_state_dict(..., assign=True)``: a new Parameter object in the module;
* ``torch.nn.utils.parametrize.register_parametrization``: the module's weight
  becomes the value computed from ``parametrizations.<name>.original``;
* ``resize_token_embeddings`` (transformers): either of the first two, with a new shape.

Per snapshot and matrix the check is a few dictionary look-ups along the module
path from the model's root, one identity test and, for an unsharded tensor,
its ``(data_ptr, shape, dtype, device)``: metadata only, no pass over a weight,
no device synchronisation. What it decides:

* the same object with the same storage: nothing (the common case);
* the path leads nowhere (a wrapper inserted after the monitor was created, e.g.
  ``apply_activation_checkpointing``): the parameter is looked up by identity in
  the model and its path updated, silently;
* an FSDP2 (DTensor) parameter whose module holds a plain tensor: FSDP2's
  unsharded parameter between forward and reshard; the DTensor is still the one
  the optimizer updates, and its local shard is read through it at every
  snapshot (FSDP2 may re-create that local tensor, so its storage is not checked):
  nothing;
* the same shape, but new storage, a new object or a parametrization: the shard
  reads the live tensor from now on (its effective value for a parametrization),
  still against the stored W0 (the mask is relative to the base, whatever tensor
  holds the weights now); one warning per snapshot names every such parameter;
* another shape: :class:`ParameterShapeChangedError`, naming each parameter with
  its old and new shapes and what to do. The monitor then disables itself: a run
  store's matrix shapes are fixed at creation and there is no "not measured"
  value for a matrix in a snapshot (every reader would fold a placeholder into the
  global and per-type numbers), so the store ends with the snapshots it has,
  every one of them measured.

FSDP1 flat parameters and lazily read tensors (``CompassMonitor.from_layout``)
have no ``source`` and are not checked.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import MonitorConfig
from .sharding import LocalShard, ShardingError

__all__ = ["Bindings", "ParameterReplacedError", "ParameterShapeChangedError"]

log = logging.getLogger(__name__)

_LIST_AT_MOST = 8


class ParameterReplacedError(ShardingError):
    """A monitored parameter was replaced by a tensor the monitor cannot follow (the message says which and why)."""


class ParameterShapeChangedError(ParameterReplacedError):
    """A monitored parameter now has another shape than when the base was taken."""


def _is_dtensor(t: Any) -> bool:
    return any(cls.__name__ == "DTensor" for cls in type(t).__mro__)


def _signature(t: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype, torch.device]:
    return (t.data_ptr(), tuple(t.shape), t.dtype, t.device)


def _plain(spec: Any) -> bool:
    """Whether the monitored matrix is its source tensor itself (no transpose, part, expert or adapter)."""
    if spec.role != "linear":
        return True
    return spec.get("layout", "out_in") == "out_in" and spec.get("rows") is None and spec.get("expert") is None and not spec.get("adapter")


def _parametrization(module: nn.Module, attr: str) -> nn.Module | None:
    lists = module._modules.get("parametrizations")
    return None if lists is None else lists._modules.get(attr)


def _resolve(root: nn.Module, path: tuple[str, ...], attr: str) -> tuple[Any, bool, nn.Module | None]:
    """(the tensor the module at ``path`` holds as ``attr``, whether it is parametrized, the module); None if none."""
    module: nn.Module | None = root
    for key in path:
        module = module._modules.get(key)
        if module is None:
            return None, False, None
    tensor = module._parameters.get(attr)
    if tensor is None:
        plist = _parametrization(module, attr)
        if plist is not None:
            # the trained tensor (one original; a right_inverse returning several: the list itself stands for them)
            return plist._parameters.get("original", plist), True, module
    return tensor, False, module


def _locations(root: nn.Module) -> Iterator[tuple[tuple[str, ...], str, bool, Any]]:
    """(module path, attribute, parametrized, tensor) of every parameter of ``root`` (the trained original of a parametrization)."""
    for name, module in root.named_modules():
        path = tuple(name.split(".")) if name else ()
        for attr, tensor in module._parameters.items():
            if tensor is None:
                continue
            if attr == "original" and len(path) >= 2 and path[-2] == "parametrizations":
                yield path[:-2], path[-1], True, tensor
            else:
                yield path, attr, False, tensor


def _locate(root: nn.Module, tensor: Any) -> tuple[tuple[str, ...], str, bool] | None:
    for path, attr, parametrized, candidate in _locations(root):
        if candidate is tensor:
            return path, attr, parametrized
    return None


@dataclass
class _Binding:
    index: int  # of the shard in the layout
    path: tuple[str, ...]  # module keys from the root
    attr: str
    obj: Any  # the tensor read (a parametrization's original)
    parametrized: bool
    shape: tuple[int, ...]  # of the measured tensor (the source's, or the parametrized value's)
    signature: tuple | None  # of an unsharded tensor; None for a DTensor
    dtensor: bool
    warned: int = 0


class Bindings:
    """Where each monitored parameter lives in the model, checked at every snapshot (see the module doc).

    Args:
        model: the model the monitor was created on (kept referenced).
        shards: the layout's shards, in store order.
        config: the monitor configuration (warning limit; selection settings for a rebind).
        world_size: ranks of the layout (a rebound DTensor's geometry).
        optimizer: the training optimizer, if the monitor was given one (a rebind says
            when the new tensor is in none of its param groups).
    """

    def __init__(self, model: nn.Module, shards: list[LocalShard], config: MonitorConfig, *, world_size: int = 1, optimizer: Any = None) -> None:
        self.root = model
        self.config = config
        self.world_size = world_size
        self.optimizer = optimizer
        where = {id(t): (path, attr, parametrized) for path, attr, parametrized, t in reversed(list(_locations(model)))}
        self.bindings: list[_Binding] = []
        for index, shard in enumerate(shards):
            source = shard.source
            if source is None or not isinstance(source, torch.Tensor) or source.is_meta or id(source) not in where:
                continue
            path, attr, parametrized = where[id(source)]
            if parametrized:  # selection never picks a parametrization's original
                continue
            dtensor = _is_dtensor(source)
            self.bindings.append(
                _Binding(index, path, attr, source, False, tuple(source.shape), None if dtensor else _signature(source), dtensor)
            )

    def __len__(self) -> int:
        return len(self.bindings)

    def check(self, shards: list[LocalShard], *, where: str = "") -> dict[int, LocalShard]:
        """The shards to read from now on, by index, where a parameter was replaced by one of its shape.

        Logs one warning naming the parameters followed anew (at most
        ``max_warnings_per_param`` per parameter). Raises
        :class:`ParameterShapeChangedError` naming every parameter whose shape
        changed, :class:`ParameterReplacedError` for a replacement that cannot
        be followed. Reads no weight.
        """
        rebound: dict[int, LocalShard] = {}
        followed: list[tuple[_Binding, str]] = []
        resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        root = self.root
        for b in self.bindings:
            tensor, parametrized, module = _resolve(root, b.path, b.attr)
            if tensor is b.obj and parametrized == b.parametrized and (b.signature is None or _signature(tensor) == b.signature):
                continue  # the common case
            if tensor is None:
                # Nothing at the old place: a wrapper inserted above it moved the same object, or it is gone.
                found = _locate(root, b.obj)
                if found is not None:
                    b.path, b.attr, _ = found
                elif not self._by_name(shards[b.index], b):
                    raise ParameterReplacedError(
                        f"parameter {shards[b.index].spec.name!r} is no longer part of the model (its module was "
                        "removed or replaced by one without it). The monitor stops here; to monitor the changed model, "
                        "create a new CompassMonitor on it (a new run store)"
                    )
                tensor, parametrized, module = _resolve(root, b.path, b.attr)
            if tensor is b.obj and parametrized == b.parametrized:
                signature = None if b.signature is None else _signature(tensor)
                if signature == b.signature:
                    continue  # moved in the module tree, not replaced
                # The same object with new storage: the shard reads it already (it goes through the object).
                shape = self._measured_shape(tensor, parametrized, module, b.attr)
                if shape != b.shape:
                    resized.append((shards[b.index].spec.name, b.shape, shape))
                    continue
                followed.append((b, "new storage: param.data = ... or .to()" + _changes(b.signature, signature)))
                b.signature = signature
                continue
            if b.dtensor and not parametrized and not _is_dtensor(tensor):
                continue  # FSDP2's unsharded parameter, registered between forward and reshard
            shape = self._measured_shape(tensor, parametrized, module, b.attr)
            if shape != b.shape:
                resized.append((shards[b.index].spec.name, b.shape, shape))
                continue
            rebound[b.index] = self._rebind(shards[b.index], b, tensor, parametrized, module)
            if parametrized and not b.parametrized:
                plist = _parametrization(module, b.attr)
                kinds = ", ".join(type(p).__name__ for p in plist) if plist is not None else "?"
                why = f"now parametrized by {kinds}: its parametrized value is measured"
            else:
                why = "a new tensor object: module replaced, load_state_dict(assign=True), ..."
                if self._outside_optimizer(tensor):
                    why += "; it is in none of the optimizer's param groups, so it will not train"
            followed.append((b, why))
            b.obj, b.parametrized = tensor, parametrized
            b.signature = None if _is_dtensor(tensor) else _signature(tensor)
        if resized:
            raise ParameterShapeChangedError(_resized_message(resized))
        self._warn(shards, followed, where)
        return rebound

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _measured_shape(tensor: Any, parametrized: bool, module: nn.Module | None, attr: str) -> tuple[int, ...]:
        if parametrized and module is not None:
            with torch.no_grad():
                return tuple(getattr(module, attr).shape)  # one evaluation of the parametrization, on the event only
        return tuple(tensor.shape)

    def _outside_optimizer(self, tensor: Any) -> bool:
        groups = getattr(self.optimizer, "param_groups", None)
        if not groups:
            return False
        return not any(p is tensor for group in groups for p in group.get("params", []))

    def _by_name(self, shard: LocalShard, b: _Binding) -> bool:
        """Point ``b`` at the tensor the model now offers under the shard's name; False if there is none."""
        matrix = self._select(shard.spec.name)
        found = None if matrix is None else _locate(self.root, matrix.source)
        if found is None:
            return False
        b.path, b.attr, _ = found
        return True

    def _select(self, name: str) -> Any:
        from .selection import select_matrices

        config = dataclasses.replace(self.config, include_frozen=True)
        selection_log = logging.getLogger("compass_monitor.selection")
        disabled, selection_log.disabled = selection_log.disabled, True  # its notes were logged at creation
        try:
            matrices = select_matrices(self.root, config).matrices
        except Exception:  # noqa: BLE001 - nothing selectable any more: the caller says the parameter is gone
            return None
        finally:
            selection_log.disabled = disabled
        return next((m for m in matrices if m.spec.name == name), None)

    def _rebind(self, shard: LocalShard, b: _Binding, tensor: Any, parametrized: bool, module: nn.Module | None) -> LocalShard:
        from .sharding import _dtensor_shard, _whole

        spec = shard.spec
        if b.dtensor or _is_dtensor(tensor):
            if parametrized or not (b.dtensor and _is_dtensor(tensor)):
                raise ParameterReplacedError(
                    f"parameter {spec.name!r} ({shard.layout}) was replaced by a {type(tensor).__name__}"
                    f"{' parametrization' if parametrized else ''} that the monitor cannot read as the same shards. "
                    "The monitor stops here; create a new CompassMonitor on the changed model (a new run store)"
                )
            new = _dtensor_shard(spec, tensor, world=self.world_size)
            if (new.start, new.numel, new.contributes) != (shard.start, shard.numel, shard.contributes):
                raise ParameterReplacedError(
                    f"parameter {spec.name!r} was replaced by a DTensor sharded differently (local range "
                    f"[{new.start}, {new.end}) instead of [{shard.start}, {shard.end})). The monitor stops here; create a "
                    "new CompassMonitor on the changed model (a new run store)"
                )
            return new
        if _plain(spec):
            if parametrized:
                view = lambda m=module, a=b.attr: getattr(m, a).detach()  # noqa: E731 - the effective weight, computed per read
            else:
                view = lambda p=tensor: p.detach()  # noqa: E731
            return _whole(spec, view, contributes=shard.contributes, layout=shard.layout, param=tensor)
        if parametrized:
            raise ParameterReplacedError(
                f"parameter {spec.name!r} is now parametrized, and the monitor reads it as a view "
                f"({spec.get('layout')}, rows={spec.get('rows')}, expert={spec.get('expert')}, adapter={spec.get('adapter')}) "
                "that it cannot take of a parametrized value. The monitor stops here; create a new CompassMonitor on the "
                "changed model (a new run store)"
            )
        matrix = self._select(spec.name)
        if matrix is None or matrix.source is not tensor or tuple(matrix.spec.shape) != tuple(spec.shape):
            raise ParameterReplacedError(
                f"parameter {spec.name!r} was replaced and the new model no longer offers it as the same matrix. "
                "The monitor stops here; create a new CompassMonitor on the changed model (a new run store)"
            )
        return _whole(spec, matrix.matrix, contributes=shard.contributes, layout=shard.layout, param=tensor)

    def _warn(self, shards: list[LocalShard], followed: list[tuple[_Binding, str]], where: str) -> None:
        cap = self.config.max_warnings_per_param
        told = [(b, why) for b, why in followed if b.warned < cap]
        for b, _ in told:
            b.warned += 1
        if not told:
            return
        items = [f"{shards[b.index].spec.name!r} ({why})" for b, why in told[:_LIST_AT_MOST]]
        more = f" and {len(told) - _LIST_AT_MOST} more" if len(told) > _LIST_AT_MOST else ""
        log.warning(
            "compass-monitor: %s%d monitored parameter(s) now hold a new tensor of the same shape, each measured through it "
            "from here on against the stored base W0: %s%s",
            where,
            len(told),
            ", ".join(items),
            more,
        )


def _changes(old: tuple, new: tuple) -> str:
    parts = []
    if old[2] != new[2]:
        parts.append(f"dtype {str(old[2]).removeprefix('torch.')} -> {str(new[2]).removeprefix('torch.')}")
    if old[3] != new[3]:
        parts.append(f"device {old[3]} -> {new[3]}")
    return f"; {', '.join(parts)}" if parts else ""


def _resized_message(resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
    first, *rest = resized
    text = f"parameter {first[0]!r} changed shape from {first[1]} to {first[2]}"
    if rest:
        listed = ", ".join(f"{name!r} from {old} to {new}" for name, old, new in rest[:_LIST_AT_MOST])
        more = f" and {len(rest) - _LIST_AT_MOST} more" if len(rest) > _LIST_AT_MOST else ""
        text += f" (and {listed}{more})"
    return (
        f"{text}: its module or tensor was replaced (layer surgery, resize_token_embeddings, param.data of another shape). "
        "A run store's matrix shapes are fixed, so the monitor stops here (the committed snapshots stay valid); to monitor "
        "the changed model, create a new CompassMonitor on it (a new run store), leaving a matrix out with "
        "MonitorConfig(name_pattern=...) if needed"
    )
