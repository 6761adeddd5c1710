"""The same model under every wrapping writes the same parameter names, and a store resumes across wrappings.

Wrappings: plain, ``torch.compile`` (``_orig_mod.``), activation checkpointing
(``_checkpoint_wrapped_module.``), both together, DDP (``module.``, gloo),
FSDP1 over activation-checkpointed blocks (``_fsdp_wrapped_module.``) and
FSDP2 (``fully_shard``). The names are the unwrapped model's ``state_dict``
keys. A store written compiled and checkpointed at step 4 resumes plain, under
DDP, FSDP1 and FSDP2.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing, checkpoint_wrapper

import dist_helpers as H
from compass_monitor import CompassMonitor, MonitorConfig, open_run
from compass_monitor.integrations.pytorch import attach_optimizer

CONFIG = MonitorConfig(every_n_steps=2, principal_rank=3, include_biases=True, include_norms=True)
RESUME_AT = 4


def _checkpointed(model: torch.nn.Module) -> torch.nn.Module:
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, H.Block))
    return model


def _wrap(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    if kind == "plain":
        return model
    if kind == "compiled":
        return torch.compile(model, backend="eager")
    if kind == "checkpointed":
        return _checkpointed(model)
    if kind == "compiled_checkpointed":
        return torch.compile(_checkpointed(model), backend="eager")
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if kind == "fsdp1":
        return H.shard_fsdp1(_checkpointed(model), use_orig_params=False)
    if kind == "fsdp2":
        return H.shard_fsdp2(model)
    raise ValueError(kind)


def _train(wrapped: torch.nn.Module, path: Path, steps: int, *, rank: int = 0, resume: bool = False, seed: int = 99) -> dict:
    group = None
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        # Every DDP rank holds the whole model: rank 0 alone monitors it, on a one-rank group (as the adapters do).
        group = torch.distributed.new_group([0])
        if rank != 0:
            optimizer = H.ExactAdam(wrapped.parameters())
            H.train_steps(wrapped, optimizer, H.batches(steps, seed=seed), rank=rank)
            return {}
    monitor = CompassMonitor(wrapped, path, config=CONFIG, resume=resume, resume_step=RESUME_AT if resume else None, group=group)
    optimizer = H.ExactAdam(wrapped.parameters())
    attach_optimizer(monitor, optimizer)
    H.train_steps(wrapped, optimizer, H.batches(steps, seed=seed), rank=rank)
    monitor.close()
    return {"disabled": monitor.disabled_reason, "step": monitor.step, "names": [s.name for s in monitor.specs]}


def _distributed(rank: int, world: int, root: str, base: str) -> dict:
    out = {}
    for kind in ("ddp", "fsdp1", "fsdp2"):
        out[kind] = _train(_wrap(kind, H.make_model()), Path(root) / kind, 4, rank=rank)
        model = H.make_model()
        model.load_state_dict(torch.load(base, weights_only=True))
        if rank == 0:
            shutil.copytree(Path(root) / "written", Path(root) / f"resumed_{kind}")
        torch.distributed.barrier()
        out[f"resumed_{kind}"] = _train(_wrap(kind, model), Path(root) / f"resumed_{kind}", 2, rank=rank, resume=True, seed=7)
    return out


@pytest.mark.slow
def test_every_wrapping_writes_the_same_names_and_resumes_across_wrappings(tmp_path):
    expected = [name for name, p in H.make_model().named_parameters()]  # every parameter is selected by CONFIG
    single = {kind: _train(_wrap(kind, H.make_model()), tmp_path / kind, 4) for kind in ("plain", "compiled", "checkpointed")}
    # The store to resume from: written compiled and checkpointed; the checkpoint is the unwrapped model's state_dict.
    model = H.make_model()
    written = _train(_wrap("compiled_checkpointed", model), tmp_path / "written", RESUME_AT)
    torch.save(model.state_dict(), tmp_path / "step4.pt")
    plain = H.make_model()
    plain.load_state_dict(torch.load(tmp_path / "step4.pt", weights_only=True))
    shutil.copytree(tmp_path / "written", tmp_path / "resumed_plain")
    resumed_plain = _train(plain, tmp_path / "resumed_plain", 2, resume=True, seed=7)
    ranks = H.spawn(_distributed, 2, str(tmp_path), str(tmp_path / "step4.pt"))
    results = {**single, "written": written, "resumed_plain": resumed_plain, **ranks[0]}
    for kind, result in results.items():
        assert result["disabled"] is None, (kind, result["disabled"])
        assert result["names"] == expected, kind
        assert [p.name for p in open_run(tmp_path / kind).params] == expected, kind
    for kind in ("plain", "ddp", "fsdp1", "fsdp2"):
        run = open_run(tmp_path / f"resumed_{kind}")
        assert list(run.steps) == [2, 4, 6], kind  # 2 and 4 from the compiled run, 6 after the resume
        assert results[f"resumed_{kind}"]["step"] == 6


def _sharded_gpt2(rank: int, world: int, path: str) -> str:
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from compass_monitor.sharding import ShardingError

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=4, vocab_size=64))
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        CompassMonitor(model, path, config=CONFIG)
    except ShardingError as exc:
        return str(exc)
    return "accepted"


def test_a_sharded_transposed_fused_matrix_is_refused_by_name(tmp_path):
    """FSDP2 shards GPT-2's (in, out) c_attn storage by rows of the *input*: no shard is a row block of q."""
    message = H.spawn(_sharded_gpt2, 2, str(tmp_path / "run"))[0]
    assert "'transformer.h.0.attn.c_attn.weight[q]'" in message
    assert "stored transposed (Conv1D, (in, out)) and a row block of the fused transformer.h.0.attn.c_attn.weight" in message
