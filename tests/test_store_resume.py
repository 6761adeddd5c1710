"""Resuming a run store: the same layout continues exactly; another model, base or setting is refused."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.integrations.pytorch import attach_optimizer
from compass_monitor.store import ResumeError

CONFIG = MonitorConfig(every_n_steps=2, principal_rank=2, key_interval=3)


class Net(nn.Module):
    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"up_proj": nn.Linear(16, hidden), "down_proj": nn.Linear(hidden, 16)}) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer["down_proj"](torch.tanh(layer["up_proj"](x)))
        return x


def make(seed: int = 0, hidden: int = 24) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net(hidden)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3)


def train(model, optimizer, first: int, last: int) -> None:
    """Steps first..last (1-based); the data of step s depends only on s, so a resumed run repeats it."""
    for s in range(first, last + 1):
        g = torch.Generator().manual_seed(1000 + s)
        optimizer.zero_grad()
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        optimizer.step()


def digest(root: Path) -> str:
    """Hash of the run's data: every file but the writer lock, whose record names the last process that
    held it (a refused resume takes the lock before it reads the store, so that nothing changes under it)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.name == "writer.lock" and path.parent == root:
            continue
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A reference run of 10 steps, and a run that saved a checkpoint at step 6 and went on to 10."""
    tmp = tmp_path_factory.mktemp("resume")
    model, optimizer = make()
    monitor = CompassMonitor(model, tmp / "reference", config=CONFIG)
    attach_optimizer(monitor, optimizer)
    train(model, optimizer, 1, 10)
    monitor.close()

    model, optimizer = make()
    monitor = CompassMonitor(model, tmp / "interrupted", config=CONFIG)
    attach_optimizer(monitor, optimizer)
    train(model, optimizer, 1, 6)
    checkpoint = {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "monitor": monitor.state_dict(),
    }
    train(model, optimizer, 7, 9)  # goes on past the checkpoint (snapshot 8 is written), then "crashes"
    monitor.flush()
    return tmp, checkpoint


def restored(checkpoint):
    model, optimizer = make(seed=123)  # a different init: every weight comes from the checkpoint
    checkpoint = copy.deepcopy(checkpoint)  # optimizer.load_state_dict keeps (and training mutates) its tensors
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer


@pytest.mark.parametrize("how", ["resume_step", "load_state_dict"])
def test_resume_truncates_and_continues_exactly(runs, how, tmp_path):
    tmp, checkpoint = runs
    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(tmp / "interrupted", run_dir)
    before = open_run(run_dir)
    assert before.steps.tolist() == [2, 4, 6, 8] and before.status == "running"

    model, optimizer = restored(checkpoint)
    if how == "resume_step":
        monitor = CompassMonitor(model, run_dir, config=CONFIG, resume=True, resume_step=checkpoint["monitor"]["step"])
    else:  # what the adapters do: resume at the store's last snapshot, then rewind to the checkpoint's state
        monitor = CompassMonitor(model, run_dir, resume=True)
        assert monitor.step == 8
        monitor.load_state_dict(checkpoint["monitor"])
    assert monitor.step == 6 and monitor.latest_step == 6
    assert monitor.state_dict()["last_snapshot_step"] == 6
    middle = open_run(run_dir)
    assert middle.steps.tolist() == [2, 4, 6] and middle.status == "running"
    attach_optimizer(monitor, optimizer)
    train(model, optimizer, 7, 10)
    monitor.close()

    run, reference = open_run(run_dir), open_run(tmp / "reference")
    assert run.status == "finished"
    assert run.steps.tolist() == reference.steps.tolist() == [2, 4, 6, 8, 10]
    # Every count, flips_since_previous across the resume included, equals the uninterrupted run's.
    np.testing.assert_array_equal(run.counts, reference.counts)
    assert run.count("flips_since_previous")[3].sum() > 0
    for p in run.params:
        for t in range(run.num_snapshots):
            np.testing.assert_array_equal(run.mask(p, t), reference.mask(p, t), err_msg=f"{p.name} snapshot {t}")
        np.testing.assert_array_equal(run.row_counts(p), reference.row_counts(p))
    events = [e["event"] for e in run.history]
    assert events[0] == "created" and "resumed" in events and events[-1] == "finished"
    resumed = [e for e in run.history if e["event"] == "resumed" and e["dropped"]]
    assert len(resumed) == 1 and resumed[0]["dropped"] == 1 and resumed[0]["kept"] == 3 and resumed[0]["step"] == 6
    assert run.commit["generation"] == 1
    from compass_monitor.store.inspect import inspect_text

    text = inspect_text(run_dir)
    assert "truncations: resumed at step 6 dropped 1 snapshot(s)" in text and "status: finished" in text
    assert "gaps: none" in text and "snapshots: 5 committed, steps 2..10; generation 1" in text


def test_changed_layout_is_refused_untouched(runs, tmp_path):
    tmp, checkpoint = runs
    before = digest(tmp / "interrupted")
    model, _ = make(hidden=25)
    with pytest.raises(ResumeError, match=r"'layers.0.up_proj.weight' has shape \(25, 16\), the store has \(24, 16\)"):
        CompassMonitor(model, tmp / "interrupted", config=CONFIG, resume=True, resume_step=6)
    extra = nn.ModuleDict({"net": make()[0], "head": nn.Linear(16, 3)})
    with pytest.raises(ResumeError, match="the model lacks 4 stored parameter"):
        CompassMonitor(extra, tmp / "interrupted", config=CONFIG, resume=True, resume_step=6)
    assert digest(tmp / "interrupted") == before


def test_other_base_and_other_settings_are_refused(runs):
    tmp, checkpoint = runs
    before = digest(tmp / "interrupted")
    model, optimizer = make(seed=7)  # same layout, another initialisation: not this run's base
    train(model, optimizer, 1, 6)
    with pytest.raises(ResumeError, match=r"differ from the stored base W0 at (9\d|100)\.\d% .*does not descend"):
        CompassMonitor(model, tmp / "interrupted", config=CONFIG, resume=True, resume_step=6)
    model, _ = restored(checkpoint)
    other = MonitorConfig(every_n_steps=2, principal_rank=2, alpha=0.25)
    with pytest.raises(ResumeError, match=r"alpha=0.25 \(the store has 0.5\)"):
        CompassMonitor(model, tmp / "interrupted", config=other, resume=True, resume_step=6)
    assert digest(tmp / "interrupted") == before


def test_damaged_base_and_missing_base_are_refused(runs, tmp_path):
    import shutil

    import zarr

    tmp, checkpoint = runs
    shutil.copytree(tmp / "interrupted", tmp_path / "damaged")
    g = zarr.open_group(str(tmp_path / "damaged"), mode="r+", use_consolidated=False)
    codes = g["base/weights/p0002"]
    codes[3, 4] = codes[3, 4] + 1
    model, _ = restored(checkpoint)
    with pytest.raises(ResumeError, match="stored base W0 of 'layers.1.up_proj.weight' does not match its fingerprint"):
        CompassMonitor(model, tmp_path / "damaged", config=CONFIG, resume=True, resume_step=6)

    model, optimizer = make()
    config = MonitorConfig(every_n_steps=2, principal_rank=2, store_base=False)
    monitor = CompassMonitor(model, tmp_path / "nobase", config=config)
    monitor.close()
    assert not (tmp_path / "nobase" / "base" / "weights").exists()
    with pytest.raises(ResumeError, match="holds no base weights W0"):
        CompassMonitor(model, tmp_path / "nobase", config=config, resume=True)


def test_resume_of_missing_store_is_clear(tmp_path):
    from compass_monitor import NotARunError

    with pytest.raises(NotARunError, match="no zarr.json"):
        CompassMonitor(make()[0], tmp_path / "nothing", resume=True)


def test_base_weights_are_the_original_w0(runs):
    tmp, _ = runs
    run = open_run(tmp / "reference")
    model, _ = make()
    for p, (name, param) in zip(run.params, [(n, w) for n, w in model.named_parameters() if n.endswith("weight")]):
        assert p.name == name
        expected = param.detach().to(torch.bfloat16).view(torch.int16).numpy()
        expected = np.where(expected == np.int16(-32768), 0, expected)  # -0 is stored canonical as +0
        np.testing.assert_array_equal(run.base_codes(p), expected)
