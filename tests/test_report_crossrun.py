"""Cross-run statistics (Sec. 2.2): Jaccard, independent baseline, consensus, step alignment, base checks.

Runs are written through the real RunWriter with masks the test chose, so every
number is checked against a recomputation from those masks (and from masks read
back through ``Run.mask``).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from compass_monitor.aggregates import by_module_type, consensus_distribution, independent_jaccard, jaccard, pooled_independent_jaccard
from compass_monitor.cli import main
from compass_monitor.report.crossrun import CrossRunError, align_steps, consensus_map, cross_run_stats, run_labels
from compass_monitor.store import open_run

from report_helpers import growing_masks, tiny_params, write_mask_run


def _exact_pair(shape: tuple[int, int], a: int, b: int, both: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Masks with |A| = a, |B| = b and |A ∩ B| = both exactly, at random positions."""
    n = shape[0] * shape[1]
    perm = rng.permutation(n)
    x = np.zeros(n, dtype=bool)
    y = np.zeros(n, dtype=bool)
    x[perm[:a]] = True
    y[perm[a - both : a - both + b]] = True
    return x.reshape(shape), y.reshape(shape)


def test_jaccard_of_runs_with_a_known_overlap(tmp_path, rng):
    params = tiny_params(layers=2)
    finals_a, finals_b, truth = [], [], []
    for p in params:
        n = p.shape[0] * p.shape[1]
        a, b = int(rng.integers(n // 5, n // 2)), int(rng.integers(n // 5, n // 2))
        both = int(rng.integers(0, min(a, b)))
        x, y = _exact_pair(p.shape, a, b, both, rng)
        finals_a.append(x)
        finals_b.append(y)
        truth.append((n, a, b, both))
    run_a = write_mask_run(tmp_path / "a", params, [10, 20, 30, 40], growing_masks(params, 4, rng, final=finals_a))
    run_b = write_mask_run(tmp_path / "b", params, [10, 20, 30, 40], growing_masks(params, 4, rng, final=finals_b))
    stats = cross_run_stats([open_run(run_a.path), open_run(run_b.path)])
    assert stats.step == 40 and stats.snapshots.tolist() == [3, 3]
    for k, (n, a, b, both) in enumerate(truth):
        assert stats.intersections[0, 1, k] == both
        assert stats.changed[:, k].tolist() == [a, b]
        j, base = stats.matrix_jaccard(k)
        assert j[0, 1] == pytest.approx(both / (a + b - both), rel=1e-12)
        p, q = a / n, b / n
        assert base[0, 1] == pytest.approx(p * q / (p + q - p * q), rel=1e-12)
    # Pooled per module type: the group's weights as one set; baseline from each matrix's own densities.
    for kind, g in stats.groups(by_module_type).items():
        idx = [k for k, p in enumerate(params) if p.module_type == kind]
        n, a, b, both = (np.array([truth[k][f] for k in idx], dtype=float) for f in range(4))
        assert g.jaccard[0, 1] == pytest.approx(both.sum() / (a + b - both).sum(), rel=1e-12)
        expected_base = (n * (a / n) * (b / n)).sum() / (n * (a / n + b / n - (a / n) * (b / n))).sum()
        assert g.baseline[0, 1] == pytest.approx(expected_base, rel=1e-12)
        assert g.mean_jaccard == g.jaccard[0, 1]


def test_independent_runs_have_jaccard_at_the_baseline_and_shared_ones_above(tmp_path, rng):
    params = tiny_params(layers=2, hidden=64, inter=96)
    p_a, p_b = 0.3, 0.6
    ind_a = [rng.random(p.shape) < p_a for p in params]
    ind_b = [rng.random(p.shape) < p_b for p in params]
    runs = [write_mask_run(tmp_path / name, params, [5, 10], [[np.zeros(p.shape, bool) for p in params], masks])
            for name, masks in (("a", ind_a), ("b", ind_b))]
    stats = cross_run_stats([open_run(r.path) for r in runs])
    overall = stats.overall()
    expected = p_a * p_b / (p_a + p_b - p_a * p_b)
    n = overall.numel
    # Sampling sd of the pooled Jaccard is ~ sqrt(J(1-J)/|A∪B|): 5 sd is a generous bound.
    sd = np.sqrt(expected * (1 - expected) / (n * (p_a + p_b - p_a * p_b)))
    assert abs(overall.jaccard[0, 1] - expected) < 5 * sd
    assert abs(overall.baseline[0, 1] - expected) < 5 * sd  # baseline from the observed densities
    # A run sharing most of A's mask has Jaccard far above its own baseline.
    shared = [a | (rng.random(p.shape) < 0.05) for a, p in zip(ind_a, params)]
    c = write_mask_run(tmp_path / "c", params, [5, 10], [[np.zeros(p.shape, bool) for p in params], shared])
    stats = cross_run_stats([open_run(runs[0].path), open_run(c.path)])
    g = stats.overall()
    assert g.jaccard[0, 1] > 0.8 and g.baseline[0, 1] < 0.35


def test_consensus_counts_and_map_match_the_masks(tmp_path, rng):
    params = tiny_params(layers=1)
    runs = []
    for r in range(3):
        masks = growing_masks(params, 5, rng)
        runs.append(write_mask_run(tmp_path / f"r{r}", params, [2, 4, 6, 8, 10], masks))
    opened = [open_run(r.path) for r in runs]
    stats = cross_run_stats(opened)
    for k, p in enumerate(params):
        votes = sum(r.masks[-1][k].astype(int) for r in runs)
        np.testing.assert_array_equal(stats.consensus[k], np.bincount(votes.ravel(), minlength=4))
        np.testing.assert_allclose(consensus_map(opened, stats.rows[:, k], stats.snapshots), votes / 3)
        for a, b in itertools.combinations(range(3), 2):
            assert stats.intersections[a, b, k] == np.count_nonzero(runs[a].masks[-1][k] & runs[b].masks[-1][k])
    # Stored counts and decoded masks agree (the diagonal comes from the masks, ``changed`` from the counts).
    for a in range(3):
        np.testing.assert_array_equal(stats.intersections[a, a], stats.changed[a])
    overall = stats.overall()
    assert overall.consensus.sum() == overall.numel
    assert overall.consensus_expected.sum() == pytest.approx(overall.numel)


def test_consensus_distribution_is_the_poisson_binomial_law():
    densities = np.array([[0.1, 0.7], [0.5, 0.2], [0.9, 0.4]])
    numel = np.array([100.0, 30.0])
    expected = np.zeros(4)
    for i in range(2):
        for votes in itertools.product((0, 1), repeat=3):
            prob = np.prod([densities[r, i] if v else 1 - densities[r, i] for r, v in enumerate(votes)])
            expected[sum(votes)] += numel[i] * prob
    np.testing.assert_allclose(consensus_distribution(densities, numel), expected, rtol=1e-12)


def test_baselines_edge_values():
    assert np.isnan(independent_jaccard(0.0, 0.0))
    assert independent_jaccard(1.0, 1.0) == 1.0
    assert independent_jaccard(0.5, 0.0) == 0.0
    empty = np.zeros((3, 4), dtype=bool)
    j, base = jaccard(empty, empty)
    assert np.isnan(j) and np.isnan(base)
    assert pooled_independent_jaccard([10, 10], [0, 10], [0, 10]) == 1.0


def test_align_steps_rules():
    exact = align_steps([np.array([10, 20, 30, 40]), np.array([20, 40, 60]), np.array([5, 10, 20, 30, 40, 50])])
    assert exact.rule == "step" and exact.steps.tolist() == [20, 40] and exact.max_lag == 0
    assert exact.snapshots.tolist() == [[1, 3], [0, 1], [2, 4]]
    # No common step: as of each step of the run with the fewest snapshots.
    asof = align_steps([np.array([3, 8, 13, 18, 23]), np.array([5, 10, 15])])
    assert asof.rule == "as-of" and asof.steps.tolist() == [5, 10, 15]
    assert asof.snapshots.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert asof.run_steps[0].tolist() == [3, 8, 13] and asof.max_lag == 2
    assert "at or before" in asof.describe()
    # Only steps inside the span all runs cover (latest first step .. earliest last step).
    late = align_steps([np.array([1, 2, 3, 50]), np.array([40, 60])])
    assert late.steps.tolist() == [40] and late.run_steps[0].tolist() == [3] and late.max_lag == 37
    with pytest.raises(CrossRunError, match="no committed snapshot"):
        align_steps([np.array([1, 2]), np.array([], dtype=np.int64)])
    with pytest.raises(CrossRunError, match="do not overlap"):
        align_steps([np.array([100, 200]), np.array([1, 2, 3])])


def test_runs_with_different_snapshot_steps_are_compared_as_stated(tmp_path, rng):
    params = tiny_params(layers=1)
    a = write_mask_run(tmp_path / "a", params, [10, 20, 30, 40, 50], growing_masks(params, 5, rng))
    b = write_mask_run(tmp_path / "b", params, [15, 30, 45], growing_masks(params, 3, rng))
    stats = cross_run_stats([open_run(a.path), open_run(b.path)])
    assert stats.alignment.rule == "step" and stats.step == 30
    assert stats.snapshots.tolist() == [2, 1]
    k = 3
    assert stats.intersections[0, 1, k] == np.count_nonzero(a.masks[2][k] & b.masks[1][k])


def test_different_bases_and_models_are_refused(tmp_path, rng):
    params = tiny_params(layers=1)
    masks = growing_masks(params, 2, rng)
    a = write_mask_run(tmp_path / "a", params, [1, 2], masks)
    fp = np.zeros((len(params), 2), dtype=np.int64)
    fp[2] = [7, 9]
    b = write_mask_run(tmp_path / "b", params, [1, 2], masks, fingerprints=fp)
    with pytest.raises(CrossRunError, match=r"different base weights \(W0 differs in 1 of 6 shared matrices, e.g. model.layers.0.self_attn.v_proj"):
        cross_run_stats([open_run(a.path), open_run(b.path)])
    wide = tiny_params(layers=1, hidden=40)
    c = write_mask_run(tmp_path / "c", wide, [1, 2], growing_masks(wide, 2, rng))
    with pytest.raises(CrossRunError, match="different shapes"):
        cross_run_stats([open_run(a.path), open_run(c.path)])
    with pytest.raises(CrossRunError, match="at least two runs"):
        cross_run_stats([open_run(a.path)])
    assert main(["compare", str(a.path), str(b.path)]) == 2


def test_run_labels_are_distinct():
    assert run_labels(["runs/demo", "runs/demo-s1"]) == ["demo", "demo-s1"]
    assert run_labels(["x/demo", "y/demo"]) == ["x/demo", "y/demo"]
    assert run_labels(["x/demo", "x/demo"]) == ["x/demo#1", "x/demo#2"]


def test_compare_command_table_and_json(tmp_path, rng, capsys):
    params = tiny_params(layers=2)
    paths = [write_mask_run(tmp_path / f"run{r}", params, [10, 20, 30], growing_masks(params, 3, rng)).path for r in range(3)]
    stats = cross_run_stats([open_run(p) for p in paths])
    assert main(["compare", *map(str, paths), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step"] == 30 and data["alignment"]["rule"] == "step"
    by_name = {g["name"]: g for g in data["groups"]}
    assert list(by_name)[:3] == ["all linear", "q", "k"]
    overall = stats.overall()
    assert by_name["all linear"]["jaccard"][0][2] == pytest.approx(overall.jaccard[0, 2])
    assert by_name["all linear"]["independent_baseline"][1][2] == pytest.approx(overall.baseline[1, 2])
    assert sum(by_name["q"]["consensus_counts"]) == by_name["q"]["weights"]
    assert main(["compare", *map(str, paths)]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("all linear") and "(" in line)
    assert f"{overall.jaccard[0, 1]:.3f} ({overall.baseline[0, 1]:.3f})" in row
    assert max(len(line) for line in text.splitlines()) <= 100
    assert main(["compare", *map(str, paths), "--step", "25"]) == 2
    assert "step 25 is not an aligned step" in capsys.readouterr().err


def test_cross_run_statistics_import_no_torch_matplotlib_or_textual():
    import subprocess
    import sys

    code = (
        "import sys, compass_monitor.report, compass_monitor.report.crossrun, compass_monitor.report.compare_table, compass_monitor.store;"
        "print(','.join(m for m in ('torch', 'matplotlib', 'textual') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
