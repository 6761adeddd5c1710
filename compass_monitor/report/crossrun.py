"""Cross-run statistics of runs from one base model (paper Sec. 2.2, Fig. 2, Fig. 8).

For R runs of the same base, at one aligned optimizer step:

* pairwise Jaccard ``|A ∩ B| / |A ∪ B|`` of the changed masks, per matrix and
  pooled per group of matrices, beside the independent-Bernoulli baseline
  ``pq / (p + q - pq)`` (``aggregates.pooled_independent_jaccard``);
* the consensus ratio ``C_ij = (1/R) sum_r M^(r)_ij`` as a histogram of how many
  weights changed in exactly k of the R runs, beside the count expected if the
  runs changed weights independently (``aggregates.consensus_distribution``).

Rules, stated once here and used by ``compass-monitor compare``, ``report`` and
the TUI's compare screen:

* **Same base.** Runs are comparable only if every matrix they share has the
  same W0: the stored base fingerprints (``Run.base_fingerprint``, one per
  matrix, from the bf16 bits of W0) must be equal, and shapes too. Otherwise
  :class:`CrossRunError` says which matrices differ.
* **Matrices** are paired by parameter name: the matrices every run monitors,
  in the first run's order.
* **Steps** are paired by optimizer step (:func:`align_steps`): the steps every
  run stored a snapshot at. If the runs share no step (e.g. snapshots every 5
  steps from step 3 in one run, every 5 from step 5 in another), each step of
  the run with the fewest snapshots that lies in the steps all runs span
  (from the latest first step to the earliest last step) is paired with every
  other run's latest snapshot at or before it (an "as-of" pairing; the largest
  lag is reported). The
  comparison at "the final snapshot" uses the last aligned step, so a run that
  continued further is compared at the last step the others reached.

Masks are decoded one matrix at a time (R masks in memory at once); everything
else comes from stored counts. Imports neither torch nor matplotlib.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np

from ..aggregates import consensus_distribution, everything_linear, pooled_independent_jaccard, pooled_jaccard, ratio
from ..store import ParamInfo, Run
from ..store.schema import StoreError

__all__ = [
    "CrossRunError",
    "StepAlignment",
    "GroupOverlap",
    "overlap_group",
    "CrossRunStats",
    "align_steps",
    "pair_matrices",
    "check_same_base",
    "run_labels",
    "cross_run_stats",
    "consensus_map",
    "MatrixOverlap",
    "matrix_overlap",
]


class CrossRunError(StoreError):
    """The runs cannot be compared (different base models, no shared matrix or step, too few runs)."""


@dataclass(frozen=True)
class StepAlignment:
    """Snapshots of R runs paired by optimizer step.

    Attributes:
        steps: (S,) int64, the aligned steps (those of the reference run for ``as-of``).
        snapshots: (R, S) int64, each run's snapshot index at each aligned step.
        run_steps: (R, S) int64, each run's own step at that snapshot (equal to ``steps`` for ``step``).
        rule: ``step`` (exact common steps) or ``as-of`` (latest snapshot at or before the step).
    """

    steps: np.ndarray
    snapshots: np.ndarray
    run_steps: np.ndarray
    rule: str

    @property
    def max_lag(self) -> int:
        """Largest distance in optimizer steps between a paired snapshot and its aligned step (0 for ``step``)."""
        return int(np.abs(self.steps[None, :] - self.run_steps).max()) if self.steps.size else 0

    def describe(self) -> str:
        """One line naming the rule, for tables and figure captions."""
        if self.rule == "step":
            return f"paired by optimizer step ({len(self.steps)} steps every run stored)"
        return (
            f"no step stored by every run: paired as of each step of the run with fewest snapshots "
            f"(latest snapshot at or before it, up to {self.max_lag} steps earlier)"
        )


def align_steps(steps: Sequence[np.ndarray]) -> StepAlignment:
    """Pair the snapshots of several runs by optimizer step (rule in the module docstring).

    Args:
        steps: per run, its (T_r,) increasing optimizer steps.

    Raises:
        CrossRunError: a run has no snapshot, or no step of one run has a snapshot at or before it in every other.
    """
    arrays = [np.asarray(s, dtype=np.int64) for s in steps]
    if any(a.size == 0 for a in arrays):
        raise CrossRunError("a run has no committed snapshot yet; compare runs once each has stored one")
    common = reduce(np.intersect1d, arrays)
    if common.size:
        snaps = np.stack([np.searchsorted(a, common) for a in arrays])
        return StepAlignment(common, snaps, np.broadcast_to(common, snaps.shape).copy(), "step")
    reference = min(range(len(arrays)), key=lambda r: (arrays[r].size, r))
    lo, hi = max(int(a[0]) for a in arrays), min(int(a[-1]) for a in arrays)
    grid = arrays[reference][(arrays[reference] >= lo) & (arrays[reference] <= hi)]
    if grid.size == 0:
        raise CrossRunError("the runs' snapshots do not overlap in optimizer steps; nothing to pair")
    snaps = np.stack([np.searchsorted(a, grid, side="right") - 1 for a in arrays])
    run_steps = np.stack([a[s] for a, s in zip(arrays, snaps)])
    return StepAlignment(grid, snaps, run_steps, "as-of")


def pair_matrices(param_lists: Sequence[Sequence[Any]]) -> np.ndarray:
    """Store indices (R, P') of the matrices every run monitors, paired by name in the first run's order.

    Raises:
        CrossRunError: no shared matrix, or a shared name with different shapes (different models).
    """
    by_name = [{p.name: p for p in params} for params in param_lists]
    shared = [p for p in param_lists[0] if all(p.name in names for names in by_name[1:])]
    if not shared:
        raise CrossRunError("the runs share no monitored matrix (paired by parameter name); were they taken from the same model?")
    for p in shared:
        shapes = {tuple(names[p.name].shape) for names in by_name}
        if len(shapes) > 1:
            raise CrossRunError(f"matrix {p.name} has different shapes across runs ({sorted(shapes)}): the runs are of different models")
    return np.array([[names[p.name].index for p in shared] for names in by_name], dtype=np.int64)


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short distinct names of runs: the directory name, with its parent where two names clash."""
    paths = [Path(p) for p in paths]
    labels = [p.name or str(p) for p in paths]
    labels = [f"{p.parent.name}/{p.name}" if labels.count(lab) > 1 else lab for p, lab in zip(paths, labels)]
    clashing = [lab for lab in labels if labels.count(lab) > 1]  # the same folder given twice: number them
    labels = [f"{lab}#{i + 1}" if lab in clashing else lab for i, lab in enumerate(labels)]
    return labels


def check_same_base(runs: Sequence[Run], rows: np.ndarray, labels: Sequence[str]) -> None:
    """Refuse runs whose shared matrices start from different W0 (stored base fingerprints differ).

    Raises:
        CrossRunError: naming the runs and the first matrices that differ.
    """
    reference = runs[0].base_fingerprint[rows[0]]
    for r in range(1, len(runs)):
        other = runs[r].base_fingerprint[rows[r]]
        differ = np.flatnonzero((reference != other).any(axis=1))
        if differ.size:
            names = ", ".join(runs[0].params[int(rows[0, i])].name for i in differ[:3])
            raise CrossRunError(
                f"{labels[0]} and {labels[r]} start from different base weights (W0 differs in {differ.size} of "
                f"{rows.shape[1]} shared matrices, e.g. {names}): cross-run overlap is defined only for runs of "
                "the same base model"
            )


@dataclass(frozen=True)
class GroupOverlap:
    """Cross-run numbers of a group of matrices (one module type, or all linear matrices).

    Attributes:
        density: (R,) changed fraction ``sum|M| / sum n`` per run.
        jaccard: (R, R) pooled Jaccard (diagonal 1).
        baseline: (R, R) its independent-Bernoulli baseline (diagonal 1).
        consensus: (R+1,) weights changed in exactly k runs (C = k/R).
        consensus_expected: (R+1,) the same expected under independence.
    """

    name: str
    num_matrices: int
    numel: int
    density: np.ndarray
    jaccard: np.ndarray
    baseline: np.ndarray
    consensus: np.ndarray
    consensus_expected: np.ndarray

    @property
    def mean_jaccard(self) -> float:
        """Mean off-diagonal pairwise Jaccard (the paper's Tab. 2 number)."""
        return _off_diagonal_mean(self.jaccard)

    @property
    def mean_baseline(self) -> float:
        return _off_diagonal_mean(self.baseline)


def overlap_group(name: str, numel: np.ndarray, changed: np.ndarray, intersections: np.ndarray, consensus: np.ndarray) -> GroupOverlap:
    """Pool the counts of a group of P matrices across R runs.

    Args:
        numel: (P,) weights per matrix.
        changed: (R, P) ``|M|`` per run.
        intersections: (R, R, P) ``|M_r ∩ M_s|``.
        consensus: (P, R+1) weights changed in exactly k runs.
    """
    r = changed.shape[0]
    jac = np.ones((r, r))
    base = np.ones((r, r))
    for a in range(r):
        for b in range(a + 1, r):
            jac[a, b] = jac[b, a] = pooled_jaccard(intersections[a, b], changed[a], changed[b])
            base[a, b] = base[b, a] = pooled_independent_jaccard(numel, changed[a], changed[b])
    return GroupOverlap(
        name=name,
        num_matrices=len(numel),
        numel=int(np.sum(numel)),
        density=ratio(changed.sum(axis=1), np.sum(numel)),
        jaccard=jac,
        baseline=base,
        consensus=np.asarray(consensus).sum(axis=0),
        consensus_expected=consensus_distribution(ratio(changed, np.asarray(numel)[None, :]), numel),
    )


def _off_diagonal_mean(matrix: np.ndarray) -> float:
    r = matrix.shape[0]
    values = matrix[~np.eye(r, dtype=bool)]
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


@dataclass(frozen=True)
class CrossRunStats:
    """Counts of R runs' changed masks at one aligned step, per shared matrix.

    Attributes:
        labels: run names (distinct).
        alignment: how snapshots were paired; ``step`` is its last step.
        snapshots: (R,) each run's snapshot index at ``step``.
        params: the shared matrices (as in the first run).
        rows: (R, P') each run's store index of each shared matrix.
        numel: (P',) weights per matrix.
        changed: (R, P') ``|M|`` per run (stored counts).
        intersections: (R, R, P') ``|M_r ∩ M_s|`` (from decoded masks; diagonal = ``changed``).
        consensus: (P', R+1) weights changed in exactly k of the R runs.
    """

    labels: tuple[str, ...]
    alignment: StepAlignment
    step: int
    snapshots: np.ndarray
    params: tuple[ParamInfo, ...]
    rows: np.ndarray
    numel: np.ndarray
    changed: np.ndarray
    intersections: np.ndarray
    consensus: np.ndarray

    @property
    def num_runs(self) -> int:
        return len(self.labels)

    def group(self, name: str, members: Sequence[int]) -> GroupOverlap:
        """Pooled numbers over the shared matrices at positions ``members``."""
        idx = np.asarray(members, dtype=np.int64)
        return overlap_group(name, self.numel[idx], self.changed[:, idx], self.intersections[:, :, idx], self.consensus[idx])

    def groups(self, key: Callable[[ParamInfo], str | None]) -> dict[str, GroupOverlap]:
        """Pooled numbers per group that ``key`` assigns (``aggregates.by_module_type``, ...); None leaves a matrix out."""
        members: dict[str, list[int]] = {}
        for k, p in enumerate(self.params):
            name = key(p)
            if name is not None:
                members.setdefault(name, []).append(k)
        return {name: self.group(name, idx) for name, idx in members.items()}

    def overall(self) -> GroupOverlap | None:
        """All shared linear matrices as one group (None if there is none)."""
        return self.groups(everything_linear).get("all linear")

    def matrix_jaccard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(R, R) Jaccard and independent baseline of shared matrix ``k`` alone."""
        g = self.group(self.params[k].name, [k])
        return g.jaccard, g.baseline


def _popcount_and(a: np.ndarray, b: np.ndarray, numel: int) -> int:
    both = np.bitwise_and(a, b)
    tail = numel % 8
    if tail:  # bits past the last weight are padding: never count them
        both[-1] &= np.uint8((0xFF << (8 - tail)) & 0xFF)
    return int(np.bitwise_count(both).sum())


def cross_run_stats(runs: Sequence[Run], *, labels: Sequence[str] | None = None, step: int | None = None) -> CrossRunStats:
    """Pairwise overlaps and consensus counts of ``runs`` at their last aligned step (or ``step``).

    Decodes each shared matrix's mask once per run (R masks of one matrix in memory at a time).

    Raises:
        CrossRunError: fewer than two runs, different bases or models, nothing to pair, ``step`` not aligned.
    """
    if len(runs) < 2:
        raise CrossRunError("cross-run comparison needs at least two runs")
    labels = tuple(labels) if labels is not None else tuple(run_labels([run.path for run in runs]))
    rows = pair_matrices([run.params for run in runs])
    check_same_base(runs, rows, labels)
    alignment = align_steps([run.steps for run in runs])
    if step is None:
        at = len(alignment.steps) - 1
    else:
        hits = np.flatnonzero(alignment.steps == step)
        if not hits.size:
            raise CrossRunError(f"step {step} is not an aligned step of these runs; aligned steps: {_step_list(alignment.steps)}")
        at = int(hits[0])
    snapshots = alignment.snapshots[:, at]
    r, num = len(runs), rows.shape[1]
    params = tuple(runs[0].params[int(i)] for i in rows[0])
    numel = np.array([p.numel for p in params], dtype=np.int64)
    changed = np.stack([run.count("changed")[int(t), rows[j]] for j, (run, t) in enumerate(zip(runs, snapshots))]).astype(np.int64)
    inter = np.zeros((r, r, num), dtype=np.int64)
    consensus = np.zeros((num, r + 1), dtype=np.int64)
    for k in range(num):
        overlap = matrix_overlap(runs, rows[:, k], snapshots)
        inter[:, :, k] = overlap.intersections
        consensus[k] = overlap.consensus
    return CrossRunStats(
        labels=labels,
        alignment=alignment,
        step=int(alignment.steps[at]),
        snapshots=snapshots,
        params=params,
        rows=rows,
        numel=numel,
        changed=changed,
        intersections=inter,
        consensus=consensus,
    )


@dataclass(frozen=True)
class MatrixOverlap:
    """One matrix across R runs: ``intersections`` (R, R) ``|M_r ∩ M_s|`` (diagonal ``|M_r|``),
    ``consensus`` (R+1,) weights changed in exactly k runs, ``votes`` (m, n) uint16 the number of
    runs that changed each weight (``C = votes / R``; None unless asked for)."""

    intersections: np.ndarray
    consensus: np.ndarray
    votes: np.ndarray | None


def matrix_overlap(runs: Sequence[Run], rows: Sequence[int], snapshots: Sequence[int], *, keep_votes: bool = False) -> MatrixOverlap:
    """Decode one matrix's mask in each run (store index ``rows[r]`` at snapshot ``snapshots[r]``) and count overlaps."""
    infos = [run.param(int(row)) for run, row in zip(runs, rows)]
    numel, shape = infos[0].numel, infos[0].shape
    packed = [run.packed_mask(info, int(t)) for run, info, t in zip(runs, infos, snapshots)]
    r = len(runs)
    inter = np.zeros((r, r), dtype=np.int64)
    for a in range(r):
        for b in range(a, r):
            inter[a, b] = inter[b, a] = _popcount_and(packed[a], packed[b], numel)
    votes = np.zeros(numel, dtype=np.uint16)
    for bits in packed:
        votes += np.unpackbits(bits, count=numel)
    consensus = np.bincount(votes, minlength=r + 1)[: r + 1].astype(np.int64)
    return MatrixOverlap(inter, consensus, votes.reshape(shape) if keep_votes else None)


def consensus_map(runs: Sequence[Run], rows: Sequence[int], snapshots: Sequence[int]) -> np.ndarray:
    """Consensus ratio ``C = mean_r M^(r)`` (m, n) float64 of one matrix (store index ``rows[r]`` in run r)."""
    votes = matrix_overlap(runs, rows, snapshots, keep_votes=True).votes
    assert votes is not None
    return votes / len(runs)


def _step_list(steps: np.ndarray) -> str:
    shown = ", ".join(str(int(s)) for s in steps[:6])
    return shown + (f", ... {int(steps[-1])}" if len(steps) > 6 else "")
