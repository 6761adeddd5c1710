"""A real training process for the TUI tests: a tiny Llama-shaped model monitored by CompassMonitor.

    python tests/tui_live_writer.py RUN_DIR INITIAL

Takes INITIAL snapshots (one per optimizer step), prints "ready N" and then
reads commands from stdin: "more K" takes K more snapshots and prints
"ready N"; "close" finishes the run (status finished) and exits.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from compass_monitor import MonitorConfig
from compass_monitor.integrations.pytorch import watch


class Block(nn.Module):
    def __init__(self, d: int = 32, f: int = 48) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, f, bias=False)
        self.mlp.up_proj = nn.Linear(d, f, bias=False)
        self.mlp.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        h = x + a.o_proj(a.q_proj(x) * torch.sigmoid(a.k_proj(x)) + a.v_proj(x))
        m = self.mlp
        return h + m.down_proj(torch.nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))


class Tiny(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.layers:
            x = block(x)
        return x


def main(run_dir: str, initial: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    monitor = watch(model, optimizer, run_dir, config=MonitorConfig(every_n_steps=1, principal_rank=4),
                    metadata={"head_dim": 8})

    done = 0

    def steps(n: int) -> None:
        nonlocal done
        for _ in range(n):
            x = torch.randn(8, 32)
            model(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
        print(f"ready {done}", flush=True)

    steps(initial)
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["more"]:
            steps(int(command[1]))
        elif command[:1] == ["close"]:
            break
    monitor.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
