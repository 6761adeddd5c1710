"""The command line: --help everywhere, and a summary whose numbers come from the store."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from compass_monitor import MonitorConfig, open_run
from compass_monitor.aggregates import by_module_type, everything_linear, group_stats
from compass_monitor.cli import build_parser, main
from compass_monitor.integrations.pytorch import watch


def commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in commands()])
def test_help(argv):
    out = subprocess.run([sys.executable, "-m", "compass_monitor.cli", *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage: compass-monitor" in out.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("cli") / "run"
    model = nn.ModuleDict({"q_proj": nn.Linear(12, 12), "down_proj": nn.Linear(12, 9)})
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    monitor = watch(model, optimizer, path, config=MonitorConfig(every_n_steps=2, principal_rank=3))
    for _ in range(6):
        optimizer.zero_grad()
        x = torch.randn(5, 12)
        (model["down_proj"](model["q_proj"](x)) ** 2).mean().backward()
        optimizer.step()
    monitor.close()
    return path


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The rows (split on spaces) of the summary table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() and " ".join(line.split()).startswith(header_start))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or not line.split()[0].isdigit():
            break
        rows.append(line.split())
    return rows


def test_summary_numbers_match_store(run_dir, capsys):
    assert main(["summary", str(run_dir)]) == 0
    text = capsys.readouterr().out
    run = open_run(run_dir)
    changed = run.count("changed")
    numel = np.array([p.numel for p in run.params])
    sparsity, overlaps = table_rows(text, "step all"), table_rows(text, "step |")
    assert [int(r[0]) for r in sparsity] == run.steps.tolist() == [int(r[0]) for r in overlaps]
    for t, (fields, over) in enumerate(zip(sparsity, overlaps)):
        assert float(fields[1]) == pytest.approx(1 - changed[t].sum() / numel.sum(), abs=5e-4)
        princ = run.count("changed_and_principal")[t].sum() / changed[t].sum()
        assert float(over[over.index("|") + 1]) == pytest.approx(princ, abs=5e-4)
    assert "finished" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_summary_fits_80_columns_with_many_module_types_and_spectral_rows(tmp_path):
    """127 columns wrapped at 80 and 120; every line now fits 80, however many module types a model has."""
    from compass_monitor.summary import summary_text

    torch.manual_seed(4)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj", "fc1", "fc2", "router", "lm_head"]  # gate_up_proj splits into gate and up
    model = nn.ModuleDict({name: nn.Linear(8, 8) for name in names})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2, spectral_every=1, spectral_k=2),
                    run_name="a-run-with-a-rather-long-name-to-wrap")
    x = torch.randn(3, 8)
    for _ in range(3):
        optimizer.zero_grad()
        sum(layer(x).sum() for layer in model.values()).backward()
        optimizer.step()
    monitor.close()
    run = open_run(tmp_path / "run")
    text = summary_text(run)
    types = group_stats(run, by_module_type)
    assert len(types) >= 9  # more types than one 80-column row holds: the table is split in blocks
    assert max(len(line) for line in text.splitlines()) <= 80, max(text.splitlines(), key=len)
    for name in types:  # every type's column is still there
        assert any(line.split()[:1] == ["step"] and name[:6] in line.split() for line in text.splitlines()), name


def test_summary_status_agrees_with_inspect_on_a_stale_run(tmp_path, capsys):
    """A run whose writer died says stale in both commands (the reader's one test of staleness), not [running]."""
    import json

    from synthetic_runs import write_synthetic_run

    path = write_synthetic_run(tmp_path / "run", snapshots=2, status="running")
    commit = json.loads((path / "commit.json").read_text())
    commit["writer"] = {"host": __import__("socket").gethostname(), "pid": 2**22 + 12345}  # no such process
    (path / "commit.json").write_text(json.dumps(commit))
    assert main(["summary", str(path)]) == 0
    summary = capsys.readouterr().out
    assert main(["inspect", str(path)]) == 0
    inspect = capsys.readouterr().out
    assert "STALE" in inspect
    assert "[stale: running, but its writer process is gone" in summary.splitlines()[0]
    assert "[running" not in summary


def test_group_stats_definitions(run_dir):
    run = open_run(run_dir)
    overall = group_stats(run, everything_linear)["all linear"]
    types = group_stats(run, by_module_type)
    assert set(types) == {"q", "down"}
    q = run.params[0]
    assert types["q"].sparsity.tolist() == pytest.approx((1 - run.count("changed")[:, 0] / q.numel).tolist())
    low = run.count("changed_and_low").sum(axis=1) / run.count("changed").sum(axis=1)
    assert overall.overlap["low"].tolist() == pytest.approx(low.tolist())
    # the random baseline of the principal and low masks is alpha = 0.5 (floor(alpha n) of odd n is slightly less)
    assert np.all(np.abs(overall.random_baseline["principal"] - 0.5) < 0.01)


def test_summary_errors_are_clear(tmp_path, capsys):
    assert main(["summary", str(tmp_path)]) == 2
    assert "not a compass-monitor run store" in capsys.readouterr().err


def test_latest_scalars_equal_store(tmp_path):
    torch.manual_seed(5)
    model = nn.ModuleDict({"q_proj": nn.Linear(10, 10), "up_proj": nn.Linear(10, 14)})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = watch(model, optimizer, tmp_path / "run", config=MonitorConfig(every_n_steps=1, principal_rank=2))
    assert monitor.latest_scalars() == {}
    for _ in range(3):
        optimizer.zero_grad()
        model["up_proj"](model["q_proj"](torch.randn(4, 10))).sum().backward()
        optimizer.step()
    live = monitor.latest_scalars()
    monitor.close()
    run = open_run(tmp_path / "run")
    stored = group_stats(run, everything_linear)["all linear"]
    assert live["compass/all_linear/sparsity"] == stored.sparsity[-1]
    assert live["compass/all_linear/null_low"] == stored.null["low"][-1]
    q = group_stats(run, by_module_type)["q"]
    assert live["compass/q/overlap_principal"] == q.overlap["principal"][-1]
    assert monitor.latest_step == 3
