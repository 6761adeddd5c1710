"""Which matrices of a checkpoint are measured, and how each is read: the live monitor's canonical views.

The live monitor decides from the model's modules (``selection``,
``canonical_views``, ``module_types``): a GPT-2 ``Conv1D`` weight, stored
(in, out), is read transposed to (out, in); a fused projection (GPT-2
``c_attn``, GPT-NeoX / Bloom / Falcon ``query_key_value`` interleaved per
head, Phi-3 ``qkv_proj`` / ``gate_up_proj``) is split into its q/k/v or
gate/up row blocks, each with its own module type and head geometry; a 3-D
expert tensor is read expert by expert. A checkpoint holds only tensors, so
the same decisions are taken the same way:

1. ``config.json`` becomes a ``transformers`` configuration
   (``AutoConfig.for_model``; never ``trust_remote_code``: no code from a
   checkpoint folder is ever run);
2. the architecture it names (``architectures[0]``, else
   ``AutoModelForCausalLM``, else ``AutoModel``) is instantiated on the
   **meta device** (no memory, no weights);
3. the live selection runs on it unchanged, and each selected view is mapped
   back to its checkpoint tensor and transform (:class:`TensorView`: the
   tensor's name, its storage layout, expert index, fused rows), applied with
   ``canonical_views.canonical_view``, the live code itself.

The architecture's views are used when every selected source tensor is in the
checkpoint with the parameter's shape. Otherwise (no ``transformers``, no or
an unknown ``model_type``, a class that cannot be built, tensors saved under
other names) the matrices are read as the file stores them
(``tensor_specs``, names and shapes only) and a warning says so: orientation
is then the file's (a ``Conv1D`` weight stays (in, out), a fused projection
stays whole as ``qkv`` / ``gate_up``), so row and column profiles, module
types and the fused matrices' reference masks can differ from a live run.
The store's ``selection`` attribute records which way was taken (``views``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..canonical_views import canonical_view
from ..config import MonitorConfig
from ..module_types import FusedPart
from ..selection import ParamSpec
from .tensor_specs import FLOAT_DTYPES, specs_from_shapes

__all__ = ["TensorView", "ViewPlan", "plan_views", "RAW_NOTE"]

log = logging.getLogger(__name__)

RAW_NOTE = (
    "matrices are read as the file stores them: orientation is the file's (a Conv1D weight stays (in, out)) and "
    "fused projections stay whole (qkv, gate_up), so row/column profiles, module types and reference masks of those "
    "can differ from a live run"
)


@dataclass(frozen=True)
class TensorView:
    """How one monitored matrix is read from a checkpoint tensor.

    Attributes:
        tensor: the checkpoint tensor's name.
        layout: ``out_in`` (as stored) or ``in_out`` (transposed on reading, ``Conv1D``).
        expert: index into dim 0 of a 3-D expert tensor, or None.
        part: the rows of a fused projection (in (out, in) orientation), or None.
    """

    tensor: str
    layout: str = "out_in"
    expert: int | None = None
    part: FusedPart | None = None

    @property
    def plain(self) -> bool:
        return self.layout == "out_in" and self.expert is None and self.part is None

    def apply(self, stored: torch.Tensor) -> torch.Tensor:
        """The matrix from the stored tensor (its header shape), exactly as the live view reads a parameter."""
        if self.plain:
            return stored
        return canonical_view(lambda: stored, layout=self.layout, expert=self.expert, part=self.part)()


@dataclass
class ViewPlan:
    """The monitored matrices in store order, how each is read, and the facts for the store.

    Attributes:
        specs: the matrices (the live selection's records on the architecture path).
        views: matrix name -> :class:`TensorView`.
        facts: the store's ``selection`` facts (``views``: ``architecture`` or ``raw tensors``, with why).
    """

    specs: list[ParamSpec]
    views: dict[str, TensorView]
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> bool:
        return self.facts.get("views") == "architecture"

    @property
    def tensors(self) -> list[str]:
        """The checkpoint tensors read, each once, in store order."""
        return list(dict.fromkeys(v.tensor for v in self.views.values()))


def _part(spec: ParamSpec, storage_shape: tuple[int, ...], layout: str) -> FusedPart | None:
    """The :class:`FusedPart` of a fused view, from the row blocks the live selection recorded."""
    blocks = spec.get("rows")
    if not blocks:
        return None
    out = storage_shape[-1] if layout == "in_out" else storage_shape[-2]
    first, stop = blocks[0]
    period = blocks[1][0] - first if len(blocks) > 1 else out
    return FusedPart(spec.module_type, spec.module_type, int(first), int(stop - first), int(period), len(blocks))


def _hf_config(config: dict[str, Any]) -> Any:
    import transformers

    fields = {k: v for k, v in config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(config["model_type"], **fields)


def _candidates(hf_config: Any, architectures: tuple[str, ...]) -> list[tuple[str, Any]]:
    import transformers

    out: list[tuple[str, Any]] = []
    for name in architectures[:1]:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            out.append((name, lambda c=cls: c(hf_config)))
    for auto in ("AutoModelForCausalLM", "AutoModel"):
        factory = getattr(transformers, auto)
        out.append((auto, lambda f=factory: f.from_config(hf_config)))
    return out


@contextlib.contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _architecture_plan(source: Any, config: MonitorConfig) -> tuple[ViewPlan | None, str]:
    """The live selection's views on the meta-device model named by ``config.json``; None and why not."""
    from ..selection import _Selector

    raw = getattr(source, "config", None) or {}
    if not raw.get("model_type"):
        return None, "config.json gives no model_type"
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None, "transformers is not installed"
    with _quiet_transformers():
        try:
            hf_config = _hf_config(raw)
        except Exception as exc:  # noqa: BLE001 - an unknown model_type raises ValueError / KeyError
            return None, f"transformers does not know model_type {raw['model_type']!r} ({type(exc).__name__})"
        reasons = []
        for label, build in _candidates(hf_config, source.architectures):
            try:
                with torch.device("meta"):
                    model = build()
            except Exception as exc:  # noqa: BLE001 - any failure to build means: not this class
                reasons.append(f"{label}: cannot be built ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            selector = _Selector(model, config, None)
            selector.probes.update(id(p) for p in model.parameters())
            try:
                selection = selector.run()
            except ValueError as exc:  # SelectionError: nothing selected
                reasons.append(f"{label}: {exc}")
                continue
            views, missing = {}, []
            for matrix in selection.matrices:
                spec, name = matrix.spec, matrix.spec.get("source")
                stored = tuple(matrix.source.shape)
                if name not in source or source.shape(name) != stored or source.dtype(name) not in FLOAT_DTYPES:
                    missing.append(f"{name} {stored}")
                    continue
                layout = spec.get("layout", "out_in")
                views[spec.name] = TensorView(name, layout, spec.get("expert"), _part(spec, stored, layout))
            if missing:
                reasons.append(f"{label}: {len(missing)} of its tensors are not in the checkpoint as such (e.g. {missing[0]})")
                continue
            facts = {"views": "architecture", "architecture": type(model).__name__, **selection.facts}
            return ViewPlan([m.spec for m in selection.matrices], views, facts), ""
    return None, "; ".join(reasons)


def plan_views(source: Any, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], config: MonitorConfig) -> ViewPlan:
    """The monitored matrices of ``source`` (the base) and how each is read: the architecture's views, else raw tensors.

    Raises:
        SelectionError: nothing matches the configuration (raw path).
    """
    plan, why = _architecture_plan(source, config)
    if plan is not None:
        log.info("compass-monitor diff: views of %s from config.json (%s on the meta device): %d matrices",
                 source.path, plan.facts["architecture"], len(plan.specs))
        return plan
    specs = specs_from_shapes(shapes, dtypes, config, where=str(source.path))
    log.warning("compass-monitor diff: the architecture of %s gives no views (%s); %s", source.path, why, RAW_NOTE)
    return ViewPlan(specs, {s.name: TensorView(s.name) for s in specs}, {"views": "raw tensors", "why": why, "note": RAW_NOTE})
