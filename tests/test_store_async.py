"""The background writer: queue policies, gaps, failures that never reach training, heartbeats."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn
from zarr.storage import LocalStore

from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.cli import main
from compass_monitor.integrations.pytorch import attach_optimizer
from compass_monitor.store import AsyncWriter, RunWriter
from compass_monitor.store.row_chunks import RowChunks
from store_stream import masks, record, specs, write_base


def bf16_changed(base: torch.Tensor, cur: torch.Tensor) -> np.ndarray:
    a = base.detach().to(torch.bfloat16).view(torch.int16).numpy()
    b = cur.detach().to(torch.bfloat16).view(torch.int16).numpy()
    zero = (a & 0x7FFF) == 0
    return (a != b) & ~(zero & ((b & 0x7FFF) == 0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(12, 20)
        self.down_proj = nn.Linear(20, 12)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.up_proj(x)))


def train(tmp_path, config, steps, *, monitored=True):
    """A real AdamW loop. Returns (model, monitor, base weights, weights after each step)."""
    torch.manual_seed(0)
    model = Net()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = CompassMonitor(model, tmp_path / "run", config=config) if monitored else None
    if monitor is not None:
        attach_optimizer(monitor, optimizer)
    after = {}
    for s in range(1, steps + 1):
        g = torch.Generator().manual_seed(s)
        optimizer.zero_grad()
        model(torch.randn(8, 12, generator=g)).pow(2).mean().backward()
        optimizer.step()  # must never raise, whatever the store does
        after[s] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, monitor, base, after


@pytest.fixture
def slow_disk(monkeypatch):
    """Every file the store writes takes ``delay`` seconds more (a slow disk, in the writer thread only).

    Files go through zarr's ``LocalStore.set`` (metadata, base) or ``RowChunks`` (per-snapshot rows).
    """
    original, original_file = LocalStore.set, RowChunks._store_file
    state = {"delay": 0.005, "row_files": 0}

    async def slow_set(self, key, value):
        await asyncio.sleep(state["delay"])
        return await original(self, key, value)

    def slow_file(path, payload, pid=0):
        time.sleep(state["delay"])
        state["row_files"] += 1
        return original_file(path, payload, pid)

    monkeypatch.setattr(LocalStore, "set", slow_set)
    monkeypatch.setattr(RowChunks, "_store_file", staticmethod(slow_file))
    return state


def check_masks_and_flips(run, base, after):
    """Stored masks equal independent bf16 masks; flips count against the previous *stored* snapshot."""
    previous = {p.name: np.zeros(p.shape, dtype=bool) for p in run.params}
    for t, step in enumerate(run.steps.tolist()):
        for p in run.params:
            expected = bf16_changed(base[p.name], after[step][p.name]).reshape(p.shape)
            np.testing.assert_array_equal(run.mask(p, t), expected, err_msg=f"{p.name} step {step}")
            assert run.count("flips_since_previous")[t, p.index] == (expected ^ previous[p.name]).sum()
            previous[p.name] = expected


def test_skip_policy_records_gaps_and_keeps_flips_consistent(tmp_path, slow_disk, caplog, capsys):
    config = MonitorConfig(every_n_steps=1, principal_rank=2, writer_queue=1, when_queue_full="skip", key_interval=2)
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        model, monitor, base, after = train(tmp_path, config, 16)
        monitor.close()
    run = open_run(tmp_path / "run")
    stored = run.steps.tolist()
    skipped = sum(c for _, _, c in run.gaps)
    assert run.status == "finished" and stored[-1] == 16  # the last snapshot (at close) is never skipped
    assert skipped > 0 and skipped + len(stored) == 16 and monitor.writer.skipped >= skipped
    assert not set(stored) & {s for a, b, _ in run.gaps for s in range(a, b + 1)}
    assert "skipped the snapshot of step" in caplog.text and "recorded as a gap" in caplog.text
    check_masks_and_flips(run, base, after)
    assert main(["inspect", str(tmp_path / "run")]) == 0
    assert f"gaps: {skipped} snapshot(s) skipped" in capsys.readouterr().out
    assert main(["summary", str(tmp_path / "run")]) == 0
    assert f"gaps: {skipped} snapshot(s) skipped" in capsys.readouterr().out


def test_block_policy_stores_every_snapshot(tmp_path, slow_disk):
    config = MonitorConfig(every_n_steps=1, principal_rank=2, writer_queue=1, when_queue_full="block", key_interval=3)
    model, monitor, base, after = train(tmp_path, config, 8)
    monitor.close()
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == list(range(1, 9)) and run.gaps == []
    assert slow_disk["row_files"] >= 8 * len(run.params)  # the slow disk did slow the snapshot rows
    check_masks_and_flips(run, base, after)


def test_disk_full_in_writer_thread_disables_monitor_training_finishes(tmp_path, monkeypatch, caplog):
    """ENOSPC from the store under the writer thread, from the 5th snapshot on: training is untouched."""
    original, original_file = LocalStore.set, RowChunks._store_file

    def full(key: str) -> bool:
        # the disk fills once 4 snapshots are committed (several snapshots may share a chunk file)
        if not re.search(r"/c[./]\d+", key) or key.startswith("base/") or "reference" in key:
            return False
        commit = tmp_path / "run" / "commit.json"
        return commit.exists() and json.loads(commit.read_text())["snapshots"] >= 4

    async def disk_full_from_snapshot_4(self, key, value):
        if full(key):
            raise OSError(errno.ENOSPC, "No space left on device", key)
        return await original(self, key, value)

    def disk_full_file(path, payload, pid=0):
        if full(path.relative_to(tmp_path / "run").as_posix()):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original_file(path, payload, pid)

    monkeypatch.setattr(LocalStore, "set", disk_full_from_snapshot_4)
    monkeypatch.setattr(RowChunks, "_store_file", staticmethod(disk_full_file))
    config = MonitorConfig(every_n_steps=1, principal_rank=2, key_interval=2)
    with caplog.at_level(logging.ERROR, logger="compass_monitor"):
        model, monitor, base, after = train(tmp_path, config, 10)
        monitor.close()  # never raises either
    assert not monitor.enabled
    assert "the run-store writer failed (snapshot of step 5): OSError: [Errno 28] No space left on device" in caplog.text
    assert "Training continues" in caplog.text
    reference, _, _, _ = train(tmp_path / "plain", config, 10, monitored=False)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name  # the monitor did not change what training did
    run = open_run(tmp_path / "run")
    assert run.status == "disabled" and run.steps.tolist() == [1, 2, 3, 4]
    check_masks_and_flips(run, base, after)
    disabled = [e for e in run.history if e["event"] == "disabled"]
    assert len(disabled) == 1 and "No space left on device" in disabled[0]["reason"]


def test_heartbeat_while_idle(tmp_path):
    writer = RunWriter.create(tmp_path / "run", params=specs(), attributes={}, key_interval=2)
    background = AsyncWriter(writer, queue_size=2, heartbeat_interval=0.1)
    background.call(write_base)
    first = open_run(tmp_path / "run").commit["heartbeat"]
    time.sleep(0.45)
    run = open_run(tmp_path / "run")
    assert run.commit["heartbeat"] > first and run.commit["heartbeat_interval"] == 0.1
    assert run.status == "running" and run.writer_alive is True and not run.is_stale
    stream = masks(2, 3)
    for t, current in enumerate(stream):
        assert background.submit(record(t + 1, current, stream[t - 1] if t else None))
    background.close()
    run = open_run(tmp_path / "run")
    assert run.status == "finished" and run.num_snapshots == 3


def test_exit_without_close_commits_queued_snapshots(tmp_path):
    """A script that never calls close(): every snapshot it took is committed; the run stays unfinished."""
    code = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from compass_monitor import MonitorConfig
        from compass_monitor.integrations.pytorch import watch
        torch.manual_seed(0)
        model = nn.Linear(64, 64)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        watch(model, opt, {str(tmp_path / 'run')!r}, config=MonitorConfig(every_n_steps=1, principal_rank=2, writer_queue=8))
        for _ in range(6):
            opt.zero_grad(); model(torch.randn(4, 64)).sum().backward(); opt.step()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert run.status == "running" and run.writer_alive is False and run.is_stale
    from compass_monitor.store.inspect import inspect_text

    text = inspect_text(tmp_path / "run")
    assert "STALE: the writer is gone; the run is unfinished and readable up to its last commit" in text
    assert ": gone" in text and "masks (frames)" in text


def test_resume_in_process_takes_over_from_unclosed_monitor(tmp_path, caplog):
    config = MonitorConfig(every_n_steps=1, principal_rank=2)
    model, first, base, after = train(tmp_path, config, 3)  # "crashed": never closed
    second = CompassMonitor(model, tmp_path / "run", resume=True)
    assert second.step == 3 and second.latest_step == 3
    with caplog.at_level(logging.ERROR, logger="compass_monitor"):
        first.on_optimizer_step()
    assert not first.enabled and "took the run store over" in caplog.text
    second.on_optimizer_step()
    second.close()
    run = open_run(tmp_path / "run")
    assert run.status == "finished" and run.steps.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("writer_queue", -1, r"writer_queue must be an integer >= 0 \(0 = write synchronously\), got -1"),
        ("writer_queue", True, "writer_queue must be an integer"),
        ("when_queue_full", "drop", "when_queue_full must be 'block' or 'skip', got 'drop'"),
        ("key_interval", 0, "key_interval must be an integer >= 1, got 0"),
    ],
)
def test_writer_config_is_validated(field, value, message):
    from compass_monitor import ConfigError

    with pytest.raises(ConfigError, match=message):
        MonitorConfig(**{field: value})


def test_synchronous_writer(tmp_path):
    config = MonitorConfig(every_n_steps=2, principal_rank=2, writer_queue=0)
    model, monitor, base, after = train(tmp_path, config, 6)
    assert open_run(tmp_path / "run").num_snapshots == 3  # committed before each step returned
    monitor.close()
    run = open_run(tmp_path / "run")
    assert run.status == "finished" and run.commit["heartbeat_interval"] is None
    check_masks_and_flips(run, base, after)
