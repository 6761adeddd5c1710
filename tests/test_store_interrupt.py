"""Ctrl-C always stops training: a SIGINT that lands inside a synchronous store write
(``writer_queue=0``) propagates as KeyboardInterrupt, it is never taken for a writer failure."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from compass_monitor.store import AsyncWriter, RunWriter, open_run
from store_stream import masks, record, specs, write_base

TRAINING = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from torch import nn
    from compass_monitor import MonitorConfig
    from compass_monitor.integrations.pytorch import watch
    from compass_monitor.store import commit, row_chunks

    where, nth = sys.argv[2], int(sys.argv[3])
    calls = [0]
    def interrupting(original):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered inside the write
            return original(*args, **kwargs)
        return wrapped
    if where == "chunk":
        row_chunks.RowChunks._store_file = staticmethod(interrupting(row_chunks.RowChunks._store_file))
    else:
        commit.write_json_atomic = interrupting(commit.write_json_atomic)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, optimizer, sys.argv[1], config=MonitorConfig(every_n_steps=1, principal_rank=2, writer_queue=0))
    for step in range(200):
        optimizer.zero_grad()
        model(torch.randn(4, 32)).pow(2).mean().backward()
        optimizer.step()
    monitor.close()
    print("trained to the end", flush=True)
    """
)

# (where the SIGINT lands, at which call): chunk files of the 1st, 2nd, 5th snapshot; commit files.
TRIALS = [("chunk", 3), ("chunk", 13), ("chunk", 50), ("commit", 4), ("commit", 9)]


@pytest.mark.slow
@pytest.mark.parametrize("where,nth", TRIALS)
def test_sigint_in_synchronous_write_stops_training(tmp_path, where, nth):
    out = subprocess.run(
        [sys.executable, "-c", TRAINING, str(tmp_path / "run"), where, str(nth)], capture_output=True, text=True, timeout=300
    )
    assert "trained to the end" not in out.stdout, out.stderr[-2000:]
    assert out.returncode != 0 and "KeyboardInterrupt" in out.stderr, (out.returncode, out.stderr[-2000:])
    assert "writer failed" not in out.stderr
    run = open_run(tmp_path / "run")  # every committed snapshot still reads
    assert run.status == "running"
    for p in run.params:
        for t in range(run.num_snapshots):
            assert int(run.mask(p, t).sum()) == run.count("changed")[t, p.index]


def test_keyboard_interrupt_propagates_from_synchronous_writer(tmp_path, monkeypatch):
    writer = RunWriter.create(tmp_path / "run", params=specs(), attributes={}, key_interval=4)
    write_base(writer)
    sync = AsyncWriter(writer, queue_size=0)
    stream = masks(1, 3)
    assert sync.submit(record(1, stream[0], None))

    def interrupted(_record):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sync.submit(record(2, stream[1], stream[0]))
    assert isinstance(sync.error, KeyboardInterrupt)  # the writer stops: the write may be half done
    assert not sync.submit(record(3, stream[2], stream[1]))
    monkeypatch.undo()

    def failing(_record):
        raise OSError(28, "No space left on device")

    other = RunWriter.create(tmp_path / "other", params=specs(), attributes={}, key_interval=4)
    sync2 = AsyncWriter(other, queue_size=0)
    monkeypatch.setattr(other, "append", failing)
    assert not sync2.submit(record(1, stream[0], None))  # an ordinary failure never raises into training
    assert isinstance(sync2.error, OSError)
    sync.abort()
    sync2.abort()
    assert open_run(tmp_path / "run").num_snapshots == 1
    np.testing.assert_array_equal(open_run(tmp_path / "run").mask(0, 0), stream[0][0])
