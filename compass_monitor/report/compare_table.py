"""The ``compass-monitor compare`` output: cross-run numbers as a terminal table or JSON.

Every number comes from :mod:`.crossrun` (which takes its ratios from
``compass_monitor.aggregates``); this module only lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..aggregates import by_module_type
from ..store import Run
from .crossrun import CrossRunStats, GroupOverlap

__all__ = ["run_letters", "ordered_groups", "compare_text", "compare_json"]

TYPE_ORDER = ("all linear", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other", "embedding", "lm_head", "norm", "bias")
_PAIR_COLUMNS_MAX_RUNS = 4  # beyond this many runs, pairs are shown as one matrix, not as columns


def run_letters(count: int) -> list[str]:
    """A, B, C, ... (then R27, R28, ...) for tables and legends."""
    return [chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(count)]


def ordered_groups(stats: CrossRunStats) -> list[GroupOverlap]:
    """All linear matrices first, then each module type in the paper's order (q, k, v, o, gate, up, down)."""
    groups = dict(stats.groups(by_module_type))
    overall = stats.overall()
    if overall is not None:
        groups["all linear"] = overall
    rank = {name: i for i, name in enumerate(TYPE_ORDER)}
    return [groups[n] for n in sorted(groups, key=lambda n: (rank.get(n, len(rank)), n))]


def _f(x: float, digits: int = 3, width: int = 6) -> str:
    return f"{'-':>{width}}" if not math.isfinite(x) else f"{x:>{width}.{digits}f}"


def _header(stats: CrossRunStats, runs: Sequence[Run]) -> list[str]:
    letters = run_letters(stats.num_runs)
    lines = [
        f"{stats.num_runs} runs of one base model, {len(stats.params)} shared matrices, compared at step {stats.step}",
        f"  steps {stats.alignment.describe()}",
    ]
    width = max(len(label) for label in stats.labels)
    for letter, label, run, t in zip(letters, stats.labels, runs, stats.snapshots):
        last = int(run.steps[-1])
        extra = f"; continues to step {last}, compared at step {int(run.steps[int(t)])}" if last != int(run.steps[int(t)]) else ""
        lines.append(f"  {letter}  {label:<{width}}  {run.num_snapshots} snapshots, steps {int(run.steps[0])}..{last}{extra}")
    return lines


def compare_text(stats: CrossRunStats, runs: Sequence[Run]) -> str:
    """The table ``compare`` prints (fits 100 columns up to four runs; more runs show pair matrices)."""
    letters = run_letters(stats.num_runs)
    groups = ordered_groups(stats)
    lines = _header(stats, runs)
    lines += ["", f"changed fraction |M|/n at step {stats.step} (1 - update sparsity, Def. 2.2)"]
    lines.append(f"{'group':<11}{'mats':>5}{'weights':>11}" + "".join(f"{x:>8}" for x in letters))
    for g in groups:
        lines.append(f"{g.name:<11}{g.num_matrices:>5}{g.numel:>11}" + "".join(f"{_f(d, 4, 8)}" for d in g.density))

    lines += ["", "pairwise Jaccard |A∩B|/|A∪B| of the masks, pooled over each group, with its independent", "baseline pq/(p+q-pq) in parentheses (Sec. 2.2); ratio = mean Jaccard / mean baseline"]
    pairs = [(a, b) for a in range(stats.num_runs) for b in range(a + 1, stats.num_runs)]
    show_pairs = stats.num_runs <= _PAIR_COLUMNS_MAX_RUNS
    head = f"{'group':<11}"
    if show_pairs:
        head += "".join(f"{letters[a] + '-' + letters[b]:>15}" for a, b in pairs)
    lines.append(head + f"{'mean J':>8}{'mean base':>10}{'ratio':>7}")
    for g in groups:
        row = f"{g.name:<11}"
        if show_pairs:
            row += "".join(f"{_f(g.jaccard[a, b], 3, 7)} ({_f(g.baseline[a, b], 3, 5)})" for a, b in pairs)
        ratio = g.mean_jaccard / g.mean_baseline if g.mean_baseline > 0 else float("nan")
        lines.append(row + f"{_f(g.mean_jaccard, 3, 8)}{_f(g.mean_baseline, 3, 10)}{_f(ratio, 2, 7)}")
    overall = next((g for g in groups if g.name == "all linear"), groups[0] if groups else None)
    if overall is None:
        return "\n".join(lines)
    if not show_pairs:
        lines += ["", f"pairwise Jaccard, {overall.name} (row run vs column run; below the diagonal: baseline)"]
        lines.append("     " + "".join(f"{x:>7}" for x in letters))
        for a in range(stats.num_runs):
            cells = [overall.jaccard[a, b] if b >= a else overall.baseline[a, b] for b in range(stats.num_runs)]
            lines.append(f"{letters[a]:<5}" + "".join(_f(c, 3, 7) for c in cells))

    r = stats.num_runs
    total = max(overall.numel, 1)
    lines += ["", f"consensus C = k/{r} over {overall.name} weights: fraction changed in exactly k of {r} runs (Fig. 2)"]
    lines.append(f"{'k':>3}{'C':>7}{'observed':>10}{'independent':>13}")
    for k in range(r + 1):
        lines.append(f"{k:>3}{k / r:>7.2f}{_f(overall.consensus[k] / total, 4, 10)}{_f(overall.consensus_expected[k] / total, 4, 13)}")
    return "\n".join(lines)


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def compare_json(stats: CrossRunStats, runs: Sequence[Run]) -> dict[str, Any]:
    """The same numbers as :func:`compare_text`, JSON-serialisable (NaN as null)."""
    letters = run_letters(stats.num_runs)

    def matrix(m: np.ndarray) -> list[list[float | None]]:
        return [[_num(v) for v in row] for row in m]

    return {
        "step": stats.step,
        "alignment": {
            "rule": stats.alignment.rule,
            "description": stats.alignment.describe(),
            "steps": [int(s) for s in stats.alignment.steps],
            "max_lag_steps": stats.alignment.max_lag,
        },
        "runs": [
            {"letter": x, "label": label, "path": str(run.path), "snapshot": int(t), "step": int(run.steps[int(t)]),
             "snapshots": run.num_snapshots, "last_step": int(run.steps[-1])}
            for x, label, run, t in zip(letters, stats.labels, runs, stats.snapshots)
        ],
        "shared_matrices": len(stats.params),
        "groups": [
            {
                "name": g.name,
                "matrices": g.num_matrices,
                "weights": g.numel,
                "density": [_num(d) for d in g.density],
                "jaccard": matrix(g.jaccard),
                "independent_baseline": matrix(g.baseline),
                "mean_jaccard": _num(g.mean_jaccard),
                "mean_baseline": _num(g.mean_baseline),
                "consensus_counts": [int(c) for c in g.consensus],
                "consensus_expected_independent": [_num(c) for c in g.consensus_expected],
            }
            for g in ordered_groups(stats)
        ],
    }
