"""Resuming past the last step the store saw: accepted, warned about once, and recorded as a gap (issue #13)."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.integrations.pytorch import attach_optimizer
from compass_monitor.store.inspect import inspect_text
from compass_monitor.summary import summary_text

CONFIG = MonitorConfig(every_n_steps=1, principal_rank=2)
GAP_WORDS = "were not monitored"


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(3, 6)).pow(2).mean().backward()
        optimizer.step()


def killed_run(run_dir, steps: int = 4, config: MonitorConfig = CONFIG, checkpoint_at: int | None = None) -> nn.Module:
    """A run trained ``steps`` steps whose process "died": its snapshots are committed, it was never closed.

    Returns the model at the end, or as checkpointed at step ``checkpoint_at``.
    """
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = CompassMonitor(model, run_dir, config=config)
    attach_optimizer(monitor, optimizer)
    checkpoint = None
    for step in range(1, steps + 1):
        train(model, optimizer, 1)
        if step == checkpoint_at:
            checkpoint = copy.deepcopy(model)
    assert monitor.flush(timeout=30)
    return checkpoint if checkpoint is not None else model  # the monitor is dropped without close(): still "running"


def monitor_optimizer(monitor: CompassMonitor, model: nn.Module) -> torch.optim.Optimizer:
    """The restored optimizer, attached to the resumed monitor (the dead run's optimizer stays out)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    attach_optimizer(monitor, optimizer)
    return optimizer


def gap_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and GAP_WORDS in r.getMessage()]


def resume_and_train(model: nn.Module, run_dir, resume_step: int | None, caplog, steps: int = 2) -> list[str]:
    """Resume at ``resume_step``, train ``steps`` more steps, close; the gap warnings logged meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        monitor = CompassMonitor(model, run_dir, resume=True, resume_step=resume_step)
        train(model, monitor_optimizer(monitor, model), steps)
        monitor.close()
    return gap_warnings(caplog)


def flat(text: str) -> str:
    return " ".join(text.split())


def resumed_events(run) -> list[dict]:
    return [e for e in run.history if e["event"] == "resumed"]


def test_resume_far_past_the_last_step_is_accepted_warned_once_and_recorded(tmp_path, caplog):
    run_dir = tmp_path / "run"
    model = killed_run(run_dir)
    assert open_run(run_dir).commit["last_step"] == 4

    warnings = resume_and_train(model, run_dir, 1000, caplog)

    run = open_run(run_dir)
    assert run.status == "finished"
    assert run.steps.tolist() == [1, 2, 3, 4, 1001, 1002]  # the resume is accepted, not refused
    assert warnings == [
        f"compass-monitor: run {run_dir} resumed at step 1000, but the store last saw step 4: steps 5..1000 were not "
        "monitored; the first snapshot after the resume compares with step 4's mask, so its step-to-step flips span "
        "that gap (recorded in the store's history as gap [4, 1000])"
    ]
    (event,) = resumed_events(run)
    assert event["step"] == 1000 and event["gap"] == [4, 1000] and event["kept"] == 4 and event["dropped"] == 0
    assert run.resume_gaps == [(4, 1000)]
    assert "not monitored (resumed past the last step the store saw): after step 4, resumed at step 1000" in flat(summary_text(run))
    assert "  not monitored: steps 5..1000 (resumed at 1000 after step 4)" in inspect_text(run_dir).splitlines()


def test_resume_at_the_last_step_records_no_gap_and_no_warning(tmp_path, caplog):
    run_dir = tmp_path / "run"
    model = killed_run(run_dir)
    for resume_step in (4, None):  # explicit, then the default (the store's last step, now 6)
        assert resume_and_train(model, run_dir, resume_step, caplog) == []
    run = open_run(run_dir)
    assert run.steps.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [e["step"] for e in resumed_events(run)] == [4, 6]
    assert all("gap" not in e for e in resumed_events(run))
    assert run.resume_gaps == []
    assert "not monitored" not in summary_text(run)
    assert "  not monitored: none" in inspect_text(run_dir).splitlines()


def test_rewind_below_the_last_step_records_no_gap(tmp_path, caplog):
    run_dir = tmp_path / "run"
    model = killed_run(run_dir, checkpoint_at=2)
    assert resume_and_train(model, run_dir, 2, caplog) == []
    run = open_run(run_dir)
    assert run.steps.tolist() == [1, 2, 3, 4]  # 3 and 4 dropped, then taken again
    (event,) = resumed_events(run)
    assert event["step"] == 2 and event["dropped"] == 2 and "gap" not in event
    assert run.resume_gaps == []


def test_resume_between_two_due_snapshots_is_no_gap(tmp_path, caplog):
    """every_n_steps=2, snapshots 2 and 4, killed at step 5: a checkpoint at 5 was monitored up to it."""
    config = MonitorConfig(every_n_steps=2, principal_rank=2)
    run_dir = tmp_path / "run"
    model = killed_run(run_dir, steps=5, config=config)
    assert resume_and_train(model, run_dir, 5, caplog, steps=1) == []
    run = open_run(run_dir)
    assert run.steps.tolist() == [2, 4, 6] and run.resume_gaps == []
    # ... but resumed at step 9 the snapshots due at 6 and 8 were never taken: steps 6..9 were unmonitored.
    run_dir = tmp_path / "far"
    model = killed_run(run_dir, steps=5, config=config)
    (warning,) = resume_and_train(model, run_dir, 9, caplog, steps=1)
    assert "the store last saw step 4: steps 6..9 at least were not monitored" in warning
    run = open_run(run_dir)
    assert run.steps.tolist() == [2, 4, 10] and run.resume_gaps == [(4, 9)]


def test_load_state_dict_past_the_store_records_the_gap_once(tmp_path, caplog):
    """What the adapters do: resume at the store's last step, then rewind to the checkpoint's step."""
    run_dir = tmp_path / "run"
    model = killed_run(run_dir)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compass_monitor"):
        monitor = CompassMonitor(model, run_dir, resume=True)
        monitor.load_state_dict({"step": 1000})
        monitor.load_state_dict({"step": 1000})  # again: the store has now seen step 1000
        train(model, monitor_optimizer(monitor, model), 1)
        assert monitor.enabled and monitor.step == 1001
        monitor.close()
    warnings = gap_warnings(caplog)
    assert len(warnings) == 1 and "resumed at step 1000, but the store last saw step 4: steps 5..1000" in warnings[0]
    run = open_run(run_dir)
    assert run.steps.tolist() == [1, 2, 3, 4, 1001]
    assert [e.get("gap") for e in resumed_events(run)] == [None, [4, 1000], None]
    assert run.resume_gaps == [(4, 1000)]


def test_a_gap_rewound_past_no_longer_applies(tmp_path, caplog):
    run_dir = tmp_path / "run"
    model = killed_run(run_dir)
    resume_and_train(model, run_dir, 1000, caplog)  # stores 1001, 1002
    (warning,) = resume_and_train(model, run_dir, 500, caplog, steps=1)  # back before the gap's end
    assert "resumed at step 500, but the store last saw step 4: steps 5..500" in warning
    run = open_run(run_dir)
    assert run.steps.tolist() == [1, 2, 3, 4, 501]
    assert run.resume_gaps == [(4, 500)]


def test_negative_resume_step_is_still_refused(tmp_path):
    import pytest

    from compass_monitor.store import ResumeError

    run_dir = tmp_path / "run"
    model = killed_run(run_dir)
    with pytest.raises(ResumeError, match="resume_step must be >= 0"):
        CompassMonitor(model, run_dir, resume=True, resume_step=-1)
    assert open_run(run_dir).resume_gaps == []
