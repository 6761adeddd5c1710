"""A plain (unsharded) model in an initialized process group: rank 0 alone monitors it, with no collective.

The usual DDP pattern (``if rank == 0: watch(...)``) must neither hang the
other ranks nor the monitor: a model every rank holds whole is one process's
job, whatever the world size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from compass_monitor import open_run

SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch import nn
    rank, world, init, run_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = None
    if rank == 0:  # rank 0 alone, as with DDP
        from compass_monitor import MonitorConfig
        from compass_monitor.integrations.pytorch import watch
        monitor = watch(model, optimizer, run_dir, config=MonitorConfig(every_n_steps=2, principal_rank=2))
    for _ in range(4):
        optimizer.zero_grad(); model(torch.randn(8, 12)).pow(2).mean().backward(); optimizer.step()
    if monitor is not None:
        monitor.close()
        print("disabled:", monitor.disabled_reason)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_rank_zero_alone_monitors_a_plain_model(tmp_path):
    init = f"file://{tmp_path / 'pg'}"
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, str(r), "2", init, str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "disabled: None" in outputs[0][0]
    run = open_run(run_dir)
    assert run.status == "finished" and run.steps.tolist() == [2, 4]
    assert run.attrs["run"]["world_size"] == 1
