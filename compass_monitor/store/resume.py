"""Checks and state for continuing a run store (``CompassMonitor(..., resume=True)``).

Resuming never takes the base from the model (at resume time the model is a
checkpoint, not W0): W0's bf16 codes are reloaded from the store
(``base/weights/<id>``) and checked against the stored fingerprint
(``matrix_probe.base_fingerprint``). Refused, with a message naming what
differs:

* a store without stored base weights (created with ``store_base=False``);
* another parameter layout (names, roles, module types, layers, shapes);
* other measurement settings (``principal_rank``, ``alpha``, selection fields);
* a stored base that no longer matches its fingerprint (a damaged store);
* a model that does not descend from the stored base: among the weights that
  were still unchanged at the kept snapshot, a checkpoint of this run differs
  from W0 only where the steps since then changed it (typically a few
  percent); a model trained from another base differs almost everywhere;
* a store that another live process on this host is writing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from ..config import MonitorConfig
from ..matrix_probe import MatrixBase, as_matrix, base_fingerprint, measure
from ..selection import ParamSpec
from . import schema
from .reader import Run, open_run

__all__ = ["ResumePlan", "plan_resume", "resume_config", "MEASUREMENT_FIELDS", "MAX_UNEXPLAINED_CHANGE"]

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
class ResumePlan:
    """What a resume keeps and the monitor state it restores."""

    step: int
    keep: int
    dropped: int
    last_snapshot_step: int | None
    latest: tuple[int, np.ndarray, np.ndarray] | None
    states: list[MatrixBase]
    class_counts: np.ndarray


def _refuse(run_dir: Any, what: str) -> schema.ResumeError:
    return schema.ResumeError(f"cannot resume {run_dir}: {what}")


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


def _check_layout(run: Run, specs: list[ParamSpec]) -> None:
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
        raise _refuse(
            run.path,
            f"process {writer['pid']} on this host is still writing it (heartbeat {age:.0f} s ago); stop it first",
        )


def plan_resume(
    run_dir: str | os.PathLike[str],
    specs: list[ParamSpec],
    params: list[torch.Tensor],
    config: MonitorConfig,
    *,
    resume_step: int | None,
    states: list[MatrixBase] | None = None,
    check_model: bool = True,
) -> ResumePlan:
    """Check that the store at ``run_dir`` can be continued by this model; say what to keep.

    Reads only. ``states`` (the monitor's own, for a rewind) skips reloading the base.
    """
    run = open_run(run_dir)
    if states is None:
        _check_not_live(run)
        _check_layout(run, specs)
        if not run.commit.get("base_weights", False):
            raise _refuse(
                run_dir,
                "the store holds no base weights W0 (created with store_base=False, or its writer stopped before "
                "writing them); without W0 the run cannot be continued. Start a new run store.",
            )
        fingerprints = run.base_fingerprint
        states = []
        for i, (spec, param) in enumerate(zip(specs, params)):
            codes = torch.from_numpy(run.base_codes(i))
            if not np.array_equal(base_fingerprint(codes).numpy(), fingerprints[i]):
                raise _refuse(
                    run_dir,
                    f"the stored base W0 of {spec.name!r} does not match its fingerprint (the store is damaged or "
                    "was modified)",
                )
            reference = torch.from_numpy(np.stack([np.packbits(run.reference_mask(i, w).ravel()) for w in schema.REFERENCE_MASKS]))
            device = torch.device("cpu") if getattr(config, "base_device", "param") == "cpu" else param.device
            states.append(
                MatrixBase(
                    spec=spec,
                    base_bits=codes.to(device),
                    reference_packed=reference.to(device),
                    previous_packed=torch.zeros_like(reference[0]).to(device),
                )
            )
    steps = run.steps
    step = int(resume_step) if resume_step is not None else int(run.commit.get("last_step") or 0)
    if step < 0:
        raise _refuse(run_dir, f"resume_step must be >= 0, got {step}")
    keep = int(np.searchsorted(steps, step, side="right"))
    if check_model:
        _check_descends(run, specs, params, states, keep)
    latest = None
    if keep:
        latest = (int(steps[keep - 1]), run.counts[keep - 1], run.null_overlap[keep - 1])
    return ResumePlan(
        step=step,
        keep=keep,
        dropped=run.num_snapshots - keep,
        last_snapshot_step=int(steps[keep - 1]) if keep else None,
        latest=latest,
        states=states,
        class_counts=run.base_class_counts,
    )


@torch.no_grad()
def _check_descends(run: Run, specs: list[ParamSpec], params: list[torch.Tensor], states: list[MatrixBase], keep: int) -> None:
    """Refuse a model whose weights differ from the stored W0 where the kept snapshot says they had not changed."""
    unchanged = differing = 0
    worst: tuple[float, str] = (0.0, "")
    for i, (spec, param, state) in enumerate(zip(specs, params, states)):
        as_matrix(param, spec)  # a resized parameter fails here with its own message
        previous = run.packed_mask(i, keep - 1) if keep else np.zeros((spec.numel + 7) // 8, dtype=np.uint8)
        probe = MatrixBase(spec=spec, base_bits=state.base_bits, reference_packed=state.reference_packed, previous_packed=state.previous_packed)
        current = measure(probe, param).packed.cpu().numpy()
        still = np.bitwise_not(previous)
        pad = previous.size * 8 - spec.numel
        if pad:
            still[-1] &= np.uint8((0xFF << pad) & 0xFF)
        n_still = int(np.bitwise_count(still).sum(dtype=np.int64))
        n_diff = int(np.bitwise_count(current & still).sum(dtype=np.int64))
        unchanged += n_still
        differing += n_diff
        if n_still and n_diff / n_still > worst[0]:
            worst = (n_diff / n_still, spec.name)
    if unchanged and differing / unchanged > MAX_UNEXPLAINED_CHANGE:
        where = f"snapshot step {int(run.steps[keep - 1])}" if keep else "the start of the run"
        raise _refuse(
            run.path,
            f"the model's weights differ from the stored base W0 at {differing / unchanged:.1%} of the weights that were "
            f"still unchanged at {where} (worst: {worst[1]!r}, {worst[0]:.1%}); a checkpoint of this run differs there "
            "only by the steps since. The model does not descend from this run's base: start a new run store.",
        )
