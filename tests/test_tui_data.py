"""The TUI's data layer (no Textual): filters, ordering, density maps, heads, status, comparison, following."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from compass_monitor import open_run
from compass_monitor.aggregates import everything_linear, group_stats
from compass_monitor.store import ParamInfo
from compass_monitor.tui.data import (
    MatrixFilter,
    RunView,
    align_runs,
    badge,
    block_density,
    discover_runs,
    head_boundaries,
    head_dim_for,
    jaccard,
    live_status,
    overlap_series,
    row_label,
    row_order,
    stale_threshold,
    writer_gone,
)
from compass_monitor.tui.source import RunSource, StatusReader, density_grid, preview_grid
from synthetic_runs import SyntheticSpec, SyntheticWriter, write_synthetic_run
from compass_monitor.tui.timeline import Timeline


def info(index: int, name: str, kind: str, layer: int, shape=(64, 64), role: str = "linear") -> ParamInfo:
    return ParamInfo(name, role, kind, layer, shape, index=index)


PARAMS = [
    info(0, "model.layers.1.mlp.down_proj.weight", "down", 1),
    info(1, "model.layers.0.self_attn.q_proj.weight", "q", 0),
    info(2, "model.layers.1.self_attn.q_proj.weight", "q", 1),
    info(3, "model.layers.0.mlp.up_proj.weight", "up", 0),
    info(4, "model.embed_tokens.weight", "embedding", -1, role="embedding"),
    info(5, "model.layers.0.self_attn.o_proj.weight", "o", 0),
]


def test_rows_group_by_layer_then_module_type():
    order = row_order(PARAMS)
    assert [row_label(PARAMS[i]) for i in order] == ["L0 q", "L0 o", "L0 up", "L1 q", "L1 down", "embedding"]


@pytest.mark.parametrize(
    "query, expected",
    [
        ("", [1, 5, 3, 2, 0, 4]),
        ("q", [1, 2]),
        ("q o 0", [1, 5]),
        ("L1", [2, 0]),
        ("0-1 mlp", [3, 0]),
        ("self_attn 1..1", [2]),
        ("embedding", [4]),
    ],
)
def test_filter_queries(query, expected):
    assert row_order(PARAMS, flt=MatrixFilter.parse(query)) == expected


def test_bad_filter_pattern_names_the_token():
    with pytest.raises(ValueError, match=r"bad pattern '\(unclosed'"):
        MatrixFilter.parse("q (unclosed")


def test_block_density_is_the_exact_block_mean():
    rng = np.random.default_rng(7)
    mask = rng.random((37, 53)) < 0.3
    grid = block_density(mask, 5, 7)
    r = np.linspace(0, 37, 6).astype(int)
    c = np.linspace(0, 53, 8).astype(int)
    expected = np.array([[mask[r[i]:r[i + 1], c[j]:c[j + 1]].mean() for j in range(7)] for i in range(5)])
    np.testing.assert_allclose(grid, expected, rtol=1e-6)
    assert block_density(mask, 100, 100).shape == (37, 53)  # never finer than the matrix


def test_head_boundaries_follow_the_head_axis():
    q = info(0, "q", "q", 0, shape=(128, 64))
    o = info(1, "o", "o", 0, shape=(64, 128))
    assert head_boundaries(q, 32, "rows") == [32, 64, 96] and head_boundaries(q, 32, "cols") == []
    assert head_boundaries(o, 32, "cols") == [32, 64, 96] and head_boundaries(o, 32, "rows") == []
    assert head_boundaries(q, 48, "rows") == []  # not divisible: no marks
    assert head_boundaries(info(2, "up", "up", 0), 32, "rows") == []


def test_head_dim_from_metadata_else_the_fallback():
    assert head_dim_for({"metadata": {"head_dim": 128}}, 64) == 128
    assert head_dim_for({"metadata": {"model_config": {"hidden_size": 384, "num_attention_heads": 12}}}, 64) == 32
    assert head_dim_for({"metadata": {}}, 80) == 80


def test_status_and_badges():
    assert live_status("running", 1000.0, now=1010.0, stale_after=60) == "live"
    assert live_status("running", 1000.0, now=1100.0, stale_after=60) == "stale"
    assert live_status("finished", 1000.0, now=9999.0, stale_after=60) == "finished"
    assert badge("live", following=True) == "LIVE"
    assert badge("live", following=False) == "PAUSED"
    assert badge("stale", following=True, heartbeat_age=3 * 3600) == "STALE 3.0h"
    assert badge("finished", following=True) == "FINISHED"
    assert badge("disabled", following=False) == "DISABLED"
    # A run that snapshots every 10 minutes is not stale after 5.
    assert stale_threshold(np.arange(10) * 600.0, 120.0) == 1800.0


def test_a_dead_writer_process_means_crashed():
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    here = socket.gethostname()
    dead = {"status": "running", "writer": {"host": here, "pid": int(done.stdout)}}
    assert writer_gone(dead)
    assert not writer_gone({**dead, "writer": {"host": here, "pid": os.getpid()}})
    assert not writer_gone({**dead, "writer": {"host": "another-host", "pid": int(done.stdout)}})
    assert not writer_gone({**dead, "status": "finished"})
    assert live_status("running", 1000.0, now=1001.0, stale_after=60, writer_alive=False) == "crashed"
    assert badge("crashed", following=True, heartbeat_age=42) == "CRASHED 42s"


def test_timeline_follow_and_scrub():
    tl = Timeline()
    tl.grow(3)
    assert tl.position == 2 and tl.following
    tl.step(-1)
    tl.grow(5)
    assert tl.position == 1 and not tl.following
    tl.follow()
    assert tl.position == 4
    tl.home()
    assert tl.position == 0 and not tl.following
    tl.end()
    tl.grow(6)
    assert tl.position == 4


def test_view_matches_the_summary_aggregates(tmp_path):
    path = write_synthetic_run(tmp_path / "run", snapshots=5, seed=3)
    run = open_run(path)
    view = RunView.load(run)
    stats = group_stats(run, everything_linear)["all linear"]
    np.testing.assert_allclose(view.global_sparsity, stats.sparsity)
    series = overlap_series(view, 0)
    counts = run.counts[:, 0]
    np.testing.assert_allclose(series[0].observed, counts[:, 1] / counts[:, 0])
    np.testing.assert_allclose(series[1].null, run.null_overlap[:, 0, 1])
    np.testing.assert_allclose(view.density[2, 3], run.mask(3, 2).mean())


def test_source_reads_only_new_snapshots_and_matches_a_fresh_load(tmp_path):
    writer = SyntheticWriter(tmp_path / "run", spec=SyntheticSpec(layers=1), seed=1)
    writer.append()
    source = RunSource(tmp_path / "run")
    assert source.load().view.num_snapshots == 1
    assert source.poll().view is None  # nothing new: one stat, no read
    writer.append()
    writer.append()
    update = source.poll()
    assert update.new_snapshots == 2 and update.view.num_snapshots == 3
    fresh = RunView.load(open_run(tmp_path / "run"))
    np.testing.assert_array_equal(update.view.counts, fresh.counts)
    np.testing.assert_array_equal(update.view.steps, fresh.steps)
    writer.finish()
    update = source.poll()
    assert update.view is None and update.commit["status"] == "finished"
    grid = density_grid(source.run, source.run.params[0], 2, 4, 4, mode="flips")
    flips = source.run.mask(0, 2) ^ source.run.mask(0, 1)
    np.testing.assert_allclose(grid.values, block_density(flips, 4, 4))
    assert grid.block_of(15, "rows") == 0 and grid.block_of(16, "rows") == 1  # 64 rows in 4 blocks
    preview = preview_grid(source.run, source.run.params[0], 2)
    mask = source.run.mask(0, 2)
    r, c = preview.row_edges, preview.col_edges
    assert preview.values[1, 2] == pytest.approx(mask[r[1]:r[2], c[2]:c[3]].mean())


def test_discovery_and_status_lines(tmp_path):
    write_synthetic_run(tmp_path / "runs" / "a", snapshots=3, seed=1)
    write_synthetic_run(tmp_path / "runs" / "group" / "b", snapshots=2, seed=2, status="running")
    (tmp_path / "runs" / "notes").mkdir()
    runs = discover_runs(tmp_path / "runs")
    assert [p.name for p in runs] == ["a", "b"]
    assert discover_runs(tmp_path / "runs" / "a") == [tmp_path / "runs" / "a"]
    reader = StatusReader()
    a = reader.status(runs[0], now=0.0, stale_after=60)
    view = RunView.load(open_run(runs[0]))
    assert a.status == "finished" and a.snapshots == 3 and a.sparsity == pytest.approx(view.global_sparsity[-1])
    b = reader.status(runs[1], now=open_run(runs[1]).commit["heartbeat"] + 3600, stale_after=60)
    assert b.status == "stale"


def test_align_by_step_and_jaccard(tmp_path):
    rng = np.random.default_rng(8)
    a = RunView.load(open_run(write_synthetic_run(tmp_path / "a", snapshots=4, seed=1)))
    b = RunView.load(open_run(write_synthetic_run(tmp_path / "b", snapshots=6, seed=2)))
    al = align_runs(a, b)
    assert al.by_step and al.steps.tolist() == [10, 20, 30, 40]
    assert al.rows_a == al.rows_b == list(range(14))
    x = rng.random((50, 40)) < 0.3
    y = rng.random((50, 40)) < 0.6
    j, base = jaccard(x, y)
    assert j == pytest.approx((x & y).sum() / (x | y).sum())
    p, q = x.mean(), y.mean()
    assert base == pytest.approx(p * q / (p + q - p * q))


def test_first_paint_reads_the_latest_snapshots_then_the_rest(tmp_path, monkeypatch):
    import compass_monitor.tui.source as source_module

    monkeypatch.setattr(source_module, "FIRST_PAINT_SNAPSHOTS", 3)
    path = write_synthetic_run(tmp_path / "run", snapshots=7, spec=SyntheticSpec(layers=1), seed=4)
    source = RunSource(path)
    first = source.load().view
    full = RunView.load(open_run(path))
    assert first.partial and first.null is None
    assert np.isnan(first.density[:4]).all()
    np.testing.assert_array_equal(first.density[4:], full.density[4:])
    np.testing.assert_array_equal(first.steps, full.steps)
    completed = source.complete()
    assert not completed.partial
    np.testing.assert_array_equal(completed.counts, full.counts)
    np.testing.assert_array_equal(completed.null, full.null)
    assert source.complete() is None
