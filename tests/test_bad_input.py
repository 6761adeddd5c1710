"""Bad input gets a clear error or a documented warning, and never corrupts a run."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compass_monitor import (
    CompassMonitor,
    ConfigError,
    MonitorConfig,
    NotARunError,
    SchemaVersionError,
    SelectionError,
    StoreExistsError,
    open_run,
)
from compass_monitor.integrations.pytorch import watch
from compass_monitor.store import StoreDamagedError


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 5))


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 9)).pow(2).mean().backward()
    optimizer.step()


def finished_run(path: Path, steps: int = 2) -> None:
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = watch(model, optimizer, path, config=MonitorConfig(every_n_steps=1, principal_rank=2))
    for _ in range(steps):
        step(model, optimizer)
    monitor.close()


def test_existing_run_is_refused_and_untouched(tmp_path):
    finished_run(tmp_path / "run")
    before = tree_digest(tmp_path / "run")
    with pytest.raises(StoreExistsError, match="already holds a run store"):
        CompassMonitor(small_model(), tmp_path / "run")
    assert tree_digest(tmp_path / "run") == before
    assert open_run(tmp_path / "run").num_snapshots == 2


def test_non_empty_directory_and_file_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not empty"):
        CompassMonitor(small_model(), tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreExistsError, match="is a file"):
        CompassMonitor(small_model(), tmp_path / "file")


def test_empty_directory_is_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    finished_run(tmp_path / "empty")
    assert open_run(tmp_path / "empty").num_snapshots == 2


def test_model_without_matching_parameters(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(SelectionError, match=r"1 embedding, 2 norm.*include_embeddings=True"):
        CompassMonitor(model, tmp_path / "run")
    with pytest.raises(SelectionError, match="name_pattern='nothing'"):
        CompassMonitor(small_model(), tmp_path / "run", config=MonitorConfig(name_pattern="nothing"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("every_n_steps", 0, "every_n_steps must be an integer >= 1, got 0"),
        ("principal_rank", 0, "principal_rank must be an integer >= 1, got 0"),
        ("alpha", 1.0, r"alpha must be in \(0, 1\), got 1.0"),
        ("name_pattern", "(", "name_pattern is not a valid regular expression"),
        ("include_linear", False, "at least one include_"),
    ],
)
def test_config_messages_name_field_and_value(field, value, message):
    with pytest.raises(ConfigError, match=message):
        MonitorConfig(**{field: value})


def test_shape_change_disables_monitor_training_continues(tmp_path, caplog):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2))
    step(model, optimizer)
    # Resize a monitored parameter in place (e.g. a vocabulary resize gone wrong).
    first = model[0]
    first.weight.data = torch.randn(8, 9)
    first.bias.data = torch.randn(8)
    model[2].weight.data = torch.randn(5, 8)
    with caplog.at_level(logging.ERROR, logger="compass_monitor"):
        for _ in range(3):
            step(model, optimizer)  # must not raise
    assert not monitor.enabled
    assert "parameter '0.weight' changed shape from (7, 9) to (8, 9) (and '2.weight' from (5, 7) to (5, 8))" in caplog.text
    assert "Training continues" in caplog.text
    monitor.close()
    run = open_run(tmp_path / "run")
    assert run.status == "disabled"
    assert run.steps.tolist() == [1]
    assert run.mask(0, 0).shape == (7, 9)


def test_nan_weights_warn_and_count_as_changed(tmp_path, caplog):
    model = small_model()
    monitor = CompassMonitor(model, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2))
    # Only the injected values change; the steps are counted by hand (as an adapter does).
    with torch.no_grad():
        model[0].weight[2, 3] = float("nan")
        model[0].weight[4, 0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        monitor.on_optimizer_step()
        monitor.on_optimizer_step()
    monitor.close()
    assert caplog.text.count("holds 2 NaN/Inf values") == 1  # warned once per parameter
    run = open_run(tmp_path / "run")
    assert run.count("nonfinite")[:, 0].tolist() == [2, 2]
    mask = run.mask(0, 0)
    assert mask[2, 3] and mask[4, 0] and mask.sum() == 2
    assert run.count("changed")[:, 1].tolist() == [0, 0]


def test_nan_in_base_warns(tmp_path, caplog):
    model = small_model()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        CompassMonitor(model, tmp_path / "run", config=MonitorConfig(principal_rank=2)).close()
    assert "base of 2.weight holds 1 NaN/Inf values" in caplog.text


def test_store_failure_mid_run_disables_monitor(tmp_path, caplog):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path / "run"
    monitor = watch(model, optimizer, run_dir, config=MonitorConfig(every_n_steps=1, principal_rank=2))
    step(model, optimizer)
    assert monitor.flush(timeout=30)  # snapshot 1 is committed before the store breaks
    # The store becomes unwritable under the monitor: a directory it writes to is now a file.
    shutil.rmtree(run_dir / "masks" / "changed")
    (run_dir / "masks" / "changed").write_text("not a directory")
    with caplog.at_level(logging.ERROR, logger="compass_monitor"):
        for _ in range(3):
            step(model, optimizer)
        monitor.flush(timeout=30)
        step(model, optimizer)  # the writer's failure reaches the monitor at the next step at the latest
    assert not monitor.enabled and "snapshot of step 2" in caplog.text and "disabled at step" in caplog.text
    monitor.close()
    run = open_run(run_dir)
    assert run.status == "disabled" and run.num_snapshots == 1


def test_reader_errors(tmp_path):
    with pytest.raises(NotARunError, match="no zarr.json"):
        open_run(tmp_path)
    finished_run(tmp_path / "run")
    meta = tmp_path / "run" / "zarr.json"
    text = meta.read_text()
    meta.write_text(text.replace('"schema_version": 2', '"schema_version": 99'))
    with pytest.raises(SchemaVersionError, match="schema 99.*Upgrade compass-monitor"):
        open_run(tmp_path / "run")
    meta.write_text("{ broken")
    with pytest.raises(StoreDamagedError, match="zarr.json cannot be read"):  # damaged, not 'not a run'
        open_run(tmp_path / "run")


def test_snapshot_index_out_of_range(tmp_path):
    finished_run(tmp_path / "run")
    run = open_run(tmp_path / "run")
    with pytest.raises(IndexError, match="2 committed snapshots"):
        run.mask(0, 2)
    assert np.array_equal(run.mask(0, -1), run.mask(0, 1))
    with pytest.raises(KeyError, match="no monitored parameter named 'nope'"):
        run.param("nope")
