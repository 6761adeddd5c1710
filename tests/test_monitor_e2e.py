"""End to end: a real optimizer trains a small model; the store must hold exactly
what happened, and every stored metric must follow from the stored masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.integrations.pytorch import attach_optimizer
from compass_monitor.precision_null import NUM_CLASSES, POSITION_BINS, base_case, null_overlaps


def bf16_values(t: torch.Tensor) -> np.ndarray:
    """Independent bf16 decode: round with torch, decode the bits with numpy."""
    codes = t.detach().to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16)
    return (codes.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def paper_changed(base: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Def. 2.1 with eta = 1e-3, NaN counted as changed."""
    with np.errstate(invalid="ignore"):
        return ~(np.abs(cur - base) <= 1e-3 * np.maximum(np.abs(base), np.abs(cur)))


class Tiny(nn.Module):
    """Odd shapes: 1-row and 1-column matrices and counts that are not multiples of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleDict({"up_proj": nn.Linear(13, 29), "down_proj": nn.Linear(29, 13)}) for _ in range(2)]
        )
        self.squeeze = nn.Linear(13, 1)
        self.expand = nn.Linear(1, 7)
        self.norm = nn.LayerNorm(13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.norm(x + layer["down_proj"](torch.tanh(layer["up_proj"](x))))
        return self.expand(self.squeeze(x))


def train(tmp_path, *, steps_planned: int, skip_at: set[int], accumulate: int, every: int):
    torch.manual_seed(1234)
    model = Tiny()
    config = MonitorConfig(every_n_steps=every, principal_rank=3, alpha=0.5)
    monitor = CompassMonitor(model, tmp_path / "run", config=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    attach_optimizer(monitor, optimizer)
    # Our own record of the weights after every real step (independent of the monitor).
    weights_after: dict[int, dict[str, torch.Tensor]] = {}
    real_steps = [0]

    def record(opt, args, kwargs):
        real_steps[0] += 1
        weights_after[real_steps[0]] = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer.register_step_post_hook(record)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for it in range(steps_planned):
        for micro in range(accumulate):
            x = torch.randn(16, 13)
            loss = model(x).pow(2).mean() / accumulate
            if it in skip_at and micro == 0:
                loss = loss * float("inf")  # a non-finite gradient: GradScaler skips the step
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    monitor.close()
    return model, monitor, base, weights_after, real_steps[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    return train(tmp, steps_planned=12, skip_at={4}, accumulate=3, every=3) + (tmp,)


def test_snapshots_at_real_steps(trained):
    model, monitor, base, weights_after, real = trained[:5]
    assert real == 11, "GradScaler should have skipped exactly one of 12 steps"
    run = open_run(trained[-1] / "run")
    assert run.status == "finished"
    # every 3 real steps, plus the last step at close()
    assert run.steps.tolist() == [3, 6, 9, 11]
    assert [p.name for p in run.params] == [
        "layers.0.up_proj.weight",
        "layers.0.down_proj.weight",
        "layers.1.up_proj.weight",
        "layers.1.down_proj.weight",
        "squeeze.weight",
        "expand.weight",
    ]
    assert [p.module_type for p in run.params][:2] == ["up", "down"]


def test_stored_masks_equal_independent_masks(trained):
    model, monitor, base, weights_after, real, tmp = trained
    run = open_run(tmp / "run")
    for t, step in enumerate(run.steps.tolist()):
        for p in run.params:
            expected = paper_changed(bf16_values(base[p.name]), bf16_values(weights_after[step][p.name]))
            np.testing.assert_array_equal(run.mask(p, t), expected.reshape(p.shape), err_msg=f"{p.name} step {step}")
        assert run.count("changed")[t].sum() > 0


def test_metrics_recomputed_from_stored_masks(trained):
    tmp = trained[-1]
    run = open_run(tmp / "run")
    for p in run.params:
        princ = run.reference_mask(p, "principal")
        low = run.reference_mask(p, "low")
        pnl = run.reference_mask(p, "principal_not_low")
        np.testing.assert_array_equal(pnl, princ & ~low)
        assert princ.sum() == low.sum() == int(np.floor(0.5 * p.numel))
        previous = np.zeros(p.shape, dtype=bool)
        rows, cols = run.row_counts(p), run.col_counts(p)
        for t in range(run.num_snapshots):
            m = run.mask(p, t)
            expected = [m.sum(), (m & princ).sum(), (m & low).sum(), (m & pnl).sum(), (m ^ previous).sum(), 0]
            assert run.counts[t, p.index].tolist() == expected, (p.name, t)
            np.testing.assert_array_equal(rows[t], m.sum(axis=1))
            np.testing.assert_array_equal(cols[t], m.sum(axis=0))
            previous = m
    recomputed = np.stack(
        [null_overlaps(run.base_class_counts, run.count("changed")[t]) for t in range(run.num_snapshots)]
    )
    np.testing.assert_allclose(run.null_overlap, recomputed, rtol=0, atol=0, equal_nan=True)


def test_class_counts_match_base(trained):
    _, monitor, base, _, _, tmp = trained
    run = open_run(tmp / "run")
    for p in run.params:
        codes = base[p.name].to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16).ravel()
        mags = codes & 0x7FFF
        classes = 2 * (mags >> 7).astype(np.int64) + ((mags & 0x7F) == 0)
        # The precision null's classes are spacing x position of W0 in its cell: summed over positions, spacing.
        by_spacing = run.base_class_counts[p.index].reshape(4, POSITION_BINS, 512).sum(axis=1)
        np.testing.assert_array_equal(by_spacing[0], np.bincount(classes, minlength=512))
        princ = run.reference_mask(p, "principal").ravel()
        np.testing.assert_array_equal(by_spacing[1], np.bincount(classes[princ], minlength=512))
        on_grid = base[p.name].float().numpy().ravel() == base[p.name].to(torch.bfloat16).float().numpy().ravel()
        assert run.base_class_counts[p.index, 0, :512].sum() == on_grid.sum()
    attributes = run.base_class_attributes
    assert attributes["case"] == base_case(run.base_class_counts)["case"] and attributes["layout"]["num_classes"] == NUM_CLASSES


def test_optional_roles_reported_separately(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 5), nn.LayerNorm(5))
    config = MonitorConfig(every_n_steps=1, include_embeddings=True, include_norms=True, include_biases=True, principal_rank=2)
    monitor = CompassMonitor(model, tmp_path / "run", config=config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    attach_optimizer(monitor, optimizer)
    loss = model(torch.tensor([1, 2, 3])).sum()
    loss.backward()
    optimizer.step()
    monitor.close()
    run = open_run(tmp_path / "run")
    roles = {p.name: (p.role, p.shape) for p in run.params}
    assert roles == {
        "0.weight": ("embedding", (11, 6)),
        "1.weight": ("linear", (5, 6)),
        "1.bias": ("bias", (1, 5)),
        "2.weight": ("norm", (1, 5)),
        "2.bias": ("norm", (1, 5)),
    }
    # only three embedding rows got gradients: the embedding's change is confined to them
    emb_rows = run.row_counts("0.weight")[0]
    assert set(np.nonzero(emb_rows)[0].tolist()) <= {1, 2, 3}
