"""compass-monitor report: the plotted data against recomputation from stored masks, and every figure rendered.

Runs come from the real writer with masks the test chose (``report_helpers``)
and from the monitor on a tiny Llama-shaped torch model (a real run with
spectral diagnostics). Plotted data are read back from the matplotlib artists.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import torch

from compass_monitor import MonitorConfig
from compass_monitor.cli import main
from compass_monitor.integrations.pytorch import watch
from compass_monitor.report import figures_cross, figures_matrix, figures_time, series
from compass_monitor.report.build import ReportConfig, ReportError, build_report
from compass_monitor.report.crossrun import CrossRunError, cross_run_stats
from compass_monitor.report.render import styled
from compass_monitor.store import open_run
from compass_monitor.store.schema import REFERENCE_MASKS

from report_helpers import growing_masks, spectral_rows, tiny_params, write_mask_run
from tui_live_writer import Tiny

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    rng = np.random.default_rng(11)
    params = tiny_params(layers=2)
    masks = growing_masks(params, 4, rng)
    masks[3][1] = masks[3][1] ^ (rng.random(params[1].shape) < 0.05)  # some weights flip back
    path = tmp_path_factory.mktemp("figures") / "run"
    return write_mask_run(path, params, [5, 10, 15, 20], masks, spectral=spectral_rows(params, 4))


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Three monitored runs of one tiny model (same W0, different data), 6 optimizer steps, spectral every 2 snapshots."""
    root = tmp_path_factory.mktemp("real")
    paths = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(3):
            torch.manual_seed(0)
            model = Tiny()
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
            config = MonitorConfig(every_n_steps=1, principal_rank=4, spectral_every=2, spectral_k=4)
            monitor = watch(model, optimizer, root / f"seed{r}", config=config, metadata={"head_dim": 8})
            data = torch.Generator().manual_seed(100 + r)
            for _ in range(6):
                x = torch.randn(8, 32, generator=data)
                loss = (model(x) - x.roll(1, dims=1)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            monitor.close()
            paths.append(root / f"seed{r}")
    finally:
        torch.set_num_threads(threads)
    return paths


def _numel(params, idx):
    return sum(params[i].shape[0] * params[i].shape[1] for i in idx)


def test_time_series_match_the_stored_masks(mask_run):
    run = open_run(mask_run.path)
    params, masks = mask_run.params, mask_run.masks
    s = series.sparsity_series(run)
    every = range(len(params))
    for t in range(4):
        changed = sum(int(masks[t][i].sum()) for i in every)
        assert s.overall[t] == pytest.approx(1 - changed / _numel(params, every), rel=1e-12)
        for kind in ("q", "down"):
            idx = [i for i, p in enumerate(params) if p.module_type == kind]
            assert s.by_type[kind][t] == pytest.approx(1 - sum(masks[t][i].sum() for i in idx) / _numel(params, idx), rel=1e-12)
    assert np.isnan(s.flips[0])
    for t in range(1, 4):
        flipped = sum(int((masks[t][i] ^ masks[t - 1][i]).sum()) for i in every)
        assert s.flips[t] == pytest.approx(flipped / _numel(params, every), rel=1e-12)
    o = series.overlap_series(run)
    for j, mask in enumerate(REFERENCE_MASKS):
        for t in range(4):
            sizes = [masks[t][i].sum() for i in every]
            inter = sum((masks[t][i] & mask_run.reference[i][j]).sum() for i in every)
            assert o.observed[mask][t] == pytest.approx(inter / sum(sizes), rel=1e-12)
            rand = sum(sz * mask_run.reference[i][j].mean() for i, sz in zip(every, sizes)) / sum(sizes)
            assert o.random[mask][t] == pytest.approx(rand, rel=1e-12)
            stand_in = [(0.4 + 0.01 * i, 0.5, 0.2)[j] for i in every]  # the nulls report_helpers stored
            assert o.null[mask][t] == pytest.approx(sum(sz * v for sz, v in zip(sizes, stand_in)) / sum(sizes), rel=1e-12)


def test_profiles_masks_and_spectral_match_the_stored_data(mask_run):
    run = open_run(mask_run.path)
    params, masks = mask_run.params, mask_run.masks
    t = 3
    for i in (0, 3, 5):
        p = run.param(i)
        prof = series.matrix_profiles(run, p, t, head_size=8)
        np.testing.assert_allclose(prof.rows, masks[t][i].mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(prof.cols, masks[t][i].mean(axis=0), rtol=1e-12)
        images = series.mask_images(run, p, t)
        np.testing.assert_array_equal(images.changed, masks[t][i])
        np.testing.assert_array_equal(images.flips, masks[t][i] ^ masks[t - 1][i])
        assert images.changed_fraction == pytest.approx(masks[t][i].mean())
    assert series.matrix_profiles(run, run.param(0), t, head_size=8).row_heads == [8, 16, 24]  # q: heads along rows
    assert series.matrix_profiles(run, run.param(3), t, head_size=8).col_heads == [8, 16, 24]  # o: along columns
    by_type = series.type_profiles(run, t)
    q = [i for i, p in enumerate(params) if p.module_type == "q"]
    np.testing.assert_allclose(by_type["q"].rows, sum(masks[t][i].mean(axis=1) for i in q) / len(q), rtol=1e-12)
    np.testing.assert_allclose(by_type["down"].cols, sum(masks[t][i].mean(axis=0) for i, p in enumerate(params) if p.module_type == "down") / 2, rtol=1e-12)
    # Large matrices: block means with the exact fractions beside them.
    reduced = series.mask_images(run, run.param(4), t, max_side=12)
    assert max(reduced.changed.shape) <= 12 and reduced.changed_fraction == pytest.approx(masks[t][4].mean())
    spec = series.spectral_series(run)
    stored = spectral_rows(params, 4)
    assert spec.steps.tolist() == [5, 15]
    for kind in ("q", "up"):
        idx = [i for i, p in enumerate(params) if p.module_type == kind]
        assert spec.by_type[kind]["nss"][1] == pytest.approx(np.mean([stored[2][i, 0] for i in idx]))
        assert spec.by_type[kind]["max_angle_deg"][1] == pytest.approx(max(max(stored[2][i, 1], stored[2][i, 2]) for i in idx))
        layers, final = spec.final_layers[kind]
        assert layers.tolist() == [0, 1] and final["topk_energy_rel_change"].tolist() == pytest.approx([stored[2][i, 3] for i in idx])


def test_figures_draw_exactly_the_series(mask_run):
    run = open_run(mask_run.path)
    with styled():
        s = series.sparsity_series(run)
        fig, reading = figures_time.sparsity_figure([("run", s)])
        left, right = fig.axes[:2]
        np.testing.assert_array_equal(left.lines[0].get_ydata(), s.overall)
        np.testing.assert_array_equal(right.lines[0].get_ydata(), s.flips)
        assert f"{s.overall[-1]:.3f} at step 20" in reading
        fig, _ = figures_time.sparsity_by_type_figure([("run", s)])
        drawn = {line.get_label(): line.get_ydata() for line in fig.axes[0].lines}
        for kind, values in s.by_type.items():
            np.testing.assert_array_equal(drawn[kind], values)
        o = series.overlap_series(run)
        fig, reading = figures_time.overlap_figure([("run", o)])
        for ax, mask in zip(fig.axes[:3], REFERENCE_MASKS):
            observed, rand, null = (line.get_ydata() for line in ax.lines[:3])
            np.testing.assert_array_equal(observed, o.observed[mask])
            np.testing.assert_array_equal(rand, o.random[mask])
            np.testing.assert_array_equal(null, o.null[mask])
        heights = [bar.get_height() for bar in fig.axes[3].patches]
        assert heights[: len(o.final_by_type)] == pytest.approx([v["principal"][0] for v in o.final_by_type.values()])
        assert f"principal mask {o.observed['principal'][-1]:.3f}" in reading
        prof = series.matrix_profiles(run, run.param(0), 3, head_size=8)
        fig, _ = figures_matrix.matrix_profiles_figure([("run", [prof])], 20)
        np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), prof.rows)
        assert sorted(line.get_xdata()[0] for line in fig.axes[0].lines[1:]) == [7.5, 15.5, 23.5]  # head boundaries
        images = series.mask_images(run, run.param(0), 3)
        fig, _ = figures_matrix.mask_figure([("run", images)])
        np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), images.changed)
        np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), images.flips)
        spec = series.spectral_series(run)
        fig, _ = figures_time.spectral_figure("run", spec)
        np.testing.assert_array_equal(fig.axes[0].lines[0].get_ydata(), spec.by_type["q"]["nss"])


def test_cross_run_figures_draw_the_statistics(tmp_path, rng):
    params = tiny_params(layers=1)
    base = [rng.random(p.shape) < 0.3 for p in params]
    paths = []
    for r in range(3):  # a shared core plus run-specific changes: Jaccard well above independence
        final = [b | (rng.random(p.shape) < 0.1) for b, p in zip(base, params)]
        paths.append(write_mask_run(tmp_path / f"r{r}", params, [1, 2], growing_masks(params, 2, rng, final=final)).path)
    runs = [open_run(p) for p in paths]
    stats = cross_run_stats(runs)
    with styled():
        fig, reading = figures_cross.jaccard_figure(stats)
        groups = stats.groups(lambda p: p.module_type)
        overall = stats.overall()
        bars = fig.axes[0].patches
        n = len(groups) + 1
        assert [b.get_height() for b in bars[:n]][0] == pytest.approx(overall.mean_jaccard)
        assert [b.get_height() for b in bars[n : 2 * n]][0] == pytest.approx(overall.mean_baseline)
        drawn = fig.axes[1].images[0].get_array()
        off = ~np.eye(3, dtype=bool)
        np.testing.assert_array_equal(drawn[off], overall.jaccard[off])
        assert drawn.mask[~off].all()  # the diagonal (a run with itself) is left blank
        assert f"{overall.mean_jaccard:.3f}" in reading and overall.mean_jaccard > 2 * overall.mean_baseline
        c = sum(open_run(p).mask(0, 1).astype(float) for p in paths) / 3
        fig, reading = figures_cross.consensus_figure(stats, [("q", c, (1.0, 1.0), [], [])])
        np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), c)
        hist = [b.get_height() for b in fig.axes[1].patches]
        assert hist[:4] == pytest.approx(list(overall.consensus / overall.numel))
        assert hist[4:8] == pytest.approx(list(overall.consensus_expected / overall.numel))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])


def _check_report_dir(out, names):
    """Every figure's PNG (signature, decodes, not blank) and SVG (parses), and both index pages list them with a reading."""
    import matplotlib.image

    index = (out / "index.md").read_text()
    listed = re.findall(r"^## \d+\. .*\n\n(.+)\n\n!\[.*\]\((.+)\.png\)\n\n\[SVG\]\((.+)\.svg\)$", index, flags=re.M)
    assert [stem for _, stem, _ in listed] == names == [svg for _, _, svg in listed]
    for reading, stem, _ in listed:
        assert reading.endswith(".") and len(reading) > 30
        png, svg = out / f"{stem}.png", out / f"{stem}.svg"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100 and pixels.std() > 0  # decodes, not blank
        assert ET.parse(svg).getroot().tag.endswith("svg")
    page = _Page()
    page.feed((out / "index.html").read_text())
    assert page.images == [f"{n}.png" for n in names] and page.links == [f"{n}.svg" for n in names]
    return index


def test_report_of_one_real_run_renders_every_figure(real_runs, tmp_path):
    report = build_report([real_runs[0]], tmp_path / "one")
    assert report.cross is None and report.index[0] == tmp_path / "one" / "index.md"
    index = _check_report_dir(tmp_path / "one", ["sparsity", "sparsity_by_type", "overlaps", "profiles_rows", "profiles_cols",
                                                 "profiles_matrices", "mask_1", "mask_2", "mask_3", "spectral"])
    assert all(fig.reading in index for fig in report.figures)


def test_report_of_three_real_runs_renders_every_figure(real_runs, tmp_path, capsys):
    out = tmp_path / "three"
    assert main(["report", *map(str, real_runs), "--out", str(out), "--matrix", "model.layers.1.self_attn.k_proj.weight"]) == 0
    printed = capsys.readouterr().out
    index = _check_report_dir(out, ["sparsity", "sparsity_by_type", "overlaps", "profiles_rows", "profiles_cols", "profiles_matrices",
                                    "mask_1", "spectral_A", "spectral_B", "spectral_C", "jaccard", "consensus"])
    assert "12. consensus.png: At step 6," in printed and f"index: {out / 'index.html'}" in printed
    assert "paired by optimizer step (6 steps every run stored); per-run views at step 6" in index
    overall = cross_run_stats([open_run(p) for p in real_runs]).overall()
    assert f"mean Jaccard {overall.mean_jaccard:.3f} against {overall.mean_baseline:.3f}" in index


def test_report_refuses_runs_of_different_bases_before_drawing(mask_run, real_runs, tmp_path, capsys):
    with pytest.raises(CrossRunError, match="share no monitored matrix|different"):
        build_report([mask_run.path, real_runs[0]], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    assert main(["report", str(mask_run.path), str(real_runs[0]), "--out", str(tmp_path / "mixed")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(KeyError, match="no monitored parameter named 'nope'"):
        build_report([mask_run.path], tmp_path / "x", config=ReportConfig(matrices=("nope",)))
    with pytest.raises(ValueError, match="head_dim must be > 0, got 0"):
        ReportConfig(head_dim=0)


def test_report_refuses_a_run_without_snapshots(tmp_path):
    from compass_monitor.store import RunWriter

    RunWriter.create(tmp_path / "empty", params=tiny_params(layers=1), attributes={})
    with pytest.raises(ReportError, match="has no committed snapshot yet"):
        build_report([tmp_path / "empty"], tmp_path / "out")
