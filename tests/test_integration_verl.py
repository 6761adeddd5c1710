"""The verl plugin: entry point, hooking verl's real TrainingWorker, reading shards through verl's ShardSpec.

verl 0.9 pins transformers<5.11, which conflicts with the transformers this
test environment uses, so the tests that import verl skip in the main
environment; ``make test`` runs this file again in ``.venv-verl`` (``pip install
'compass-monitor[verl]'``, CPU is enough: verl's real classes, FSDP2 on a gloo
process group, no GPU and no Ray cluster), with ``COMPASS_REQUIRE_VERL=1`` so
that a missing verl fails there instead of skipping. The proxy and entry-point
tests run everywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

from compass_monitor import MonitorConfig
from compass_monitor.selection import select_parameters

PLUGIN = "compass_monitor.integrations.verl_plugin"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.up_proj = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(16)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(20, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 20, bias=False)


def _fully_shard(model: nn.Module, pg_file: str, rank: int = 0, world_size: int = 1) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def test_entry_point_is_registered():
    points = importlib.metadata.entry_points(group="verl.plugins")
    assert any(point.value == PLUGIN for point in points), "reinstall compass-monitor (pip install -e .) to register it"


def test_proxy_of_an_fsdp2_model_selects_like_the_plain_model(tmp_path):
    """The proxy keeps names and module classes (not FSDP2's FSDPLinear), so selection and roles are unchanged."""
    from compass_monitor.integrations.verl_plugin import build_proxy

    config = MonitorConfig(include_embeddings=True, include_lm_head=True, include_norms=True, include_biases=True)
    torch.manual_seed(0)
    plain = Tiny()
    expected = [spec for spec, _ in select_parameters(plain, config)]
    sharded = Tiny()
    sharded.load_state_dict(plain.state_dict())
    _fully_shard(sharded, str(tmp_path / "pg"))
    try:
        tensors = {name: p.to_local().detach().to(torch.bfloat16) for name, p in sharded.named_parameters()}
        proxy = build_proxy(sharded, tensors)
    finally:
        dist.destroy_process_group()
    selected = select_parameters(proxy, config)
    assert [spec for spec, _ in selected] == expected
    assert all(torch.equal(p, plain.get_parameter(s.name).detach().to(torch.bfloat16)) for s, p in selected)


# `make test` runs this file a second time in .venv-verl with COMPASS_REQUIRE_VERL=1, where these must run.
needs_verl = pytest.mark.skipif(
    importlib.util.find_spec("verl") is None and not os.environ.get("COMPASS_REQUIRE_VERL"),
    reason="verl is not installed here (verl 0.9 pins transformers<5.11); `make test` runs these in .venv-verl",
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COMPASS_MONITOR_")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300)


@needs_verl
def test_verl_loads_the_plugin_and_it_hooks_the_training_worker(tmp_path):
    """``import verl`` loads the entry point; importing the workers then patches the real TrainingWorker."""
    code = """
        import sys
        import verl
        assert "compass_monitor.integrations.verl_plugin" in sys.modules
        from verl.workers import engine_workers
        from verl.single_controller.base.decorator import MAGIC_ATTR
        worker = engine_workers.TrainingWorker
        print("patched", getattr(worker, "_compass_patched", False))
        for name in ("train_mini_batch", "save_checkpoint", "load_checkpoint"):
            method = getattr(worker, name)
            # verl dispatches by the attribute its @register put on the method: it must survive the wrapper
            assert getattr(method, MAGIC_ATTR) == getattr(method.__wrapped__, MAGIC_ATTR), name
        print("dispatch kept")
    """
    on = _python(code, COMPASS_MONITOR_RUN_DIR=str(tmp_path / "run"))
    assert on.returncode == 0, on.stderr[-3000:]
    assert "patched True" in on.stdout and "dispatch kept" in on.stdout
    off = _python(
        """
        import verl
        from verl.workers import engine_workers
        print("patched", getattr(engine_workers.TrainingWorker, "_compass_patched", False))
        """
    )
    assert off.returncode == 0, off.stderr[-3000:]
    assert "patched False" in off.stdout  # without COMPASS_MONITOR_RUN_DIR the plugin leaves verl alone


@needs_verl
def test_whole_local_tensors_from_verls_shard_specs(tmp_path):
    """One rank: verl's ShardSpec of each FSDP2 DTensor places a whole tensor, returned in its full shape."""
    from verl.workers.engine.spec import ShardSpec

    from compass_monitor.integrations.verl_plugin import whole_local_tensors

    torch.manual_seed(1)
    model = Tiny()
    reference = {k: v.detach().clone() for k, v in model.named_parameters()}
    _fully_shard(model, str(tmp_path / "pg"))
    try:
        # what FSDPEngine.get_per_tensor_param_shard yields: (name, flat local bf16 shard, ShardSpec)
        shards = [
            (name, p.to_local().detach().to(torch.bfloat16).reshape(-1), ShardSpec.from_param(p))
            for name, p in model.state_dict().items()
        ]
        assert all(spec.mesh is not None for _, _, spec in shards)  # real DTensor placements
        tensors = whole_local_tensors(iter(shards), wanted={"layers.0.q_proj.weight", "lm_head.weight"})
    finally:
        dist.destroy_process_group()
    assert set(tensors) == {"layers.0.q_proj.weight", "lm_head.weight"}
    for name, tensor in tensors.items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16))


def _sharded_rank(rank: int, pg_file: str, out_dir: str) -> None:
    from verl.workers.engine.spec import ShardSpec

    from compass_monitor.integrations._sharding import UnsupportedShardingError
    from compass_monitor.integrations.verl_plugin import whole_local_tensors

    model = Tiny()
    _fully_shard(model, pg_file, rank=rank, world_size=2)
    try:
        shards = [
            (name, p.to_local().detach().reshape(-1), ShardSpec.from_param(p)) for name, p in model.state_dict().items()
        ]
        try:
            whole_local_tensors(iter(shards))
            result = "accepted"
        except UnsupportedShardingError as exc:
            result = "refused: " + str(exc)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as handle:
        handle.write(result)


@needs_verl
def test_a_sharded_actor_is_refused(tmp_path):
    """Two ranks, FSDP2 Shard(0): each rank holds half a matrix, which the core cannot measure yet."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_rank, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}").read_text()
        assert text.startswith("refused") and "sharded support" in text, text


@needs_verl
@pytest.mark.parametrize(("read", "world_size"), [("auto", 1), ("export", 1), ("auto", 2)])
def test_plugin_on_verls_fsdp_engine_with_checkpoint_resume(tmp_path, read, world_size):
    """verl's real TrainingWorker + FSDP2 engine on the CPU (examples/verl_cpu.py), monitored by the plugin.

    Phase 1: three updates of two mini-batches (optimizer steps 1..6), a checkpoint after the second
    update (step 4), then the process exits without closing (a crash). Phase 2: a new process loads
    the checkpoint and runs two more updates (steps 5..8): the store drops the crashed run's step 6,
    redoes it, and ends at step 8, measured against the original W0. ``read``: the plugin reads the weights
    from the engine's module (the core's sharded path, where the core has it) or through verl's shard export.
    ``world_size`` 2: FSDP2 shards the actor over two gloo ranks, one monitor per rank (needs the core's
    sharded support).
    """
    from compass_monitor.integrations._sharding import core_supports_sharding

    if world_size > 1 and not core_supports_sharding():
        pytest.skip("the core has no sharded support")
    import json

    from safetensors.torch import load_file

    from _tiny_lm import tiny_llama, tiny_tokenizer
    from compass_monitor import open_run
    from compass_monitor.aggregates import everything_linear, group_stats, scalars

    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "verl_cpu.py")
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt" / "actor"
    ckpt.mkdir(parents=True)
    seen = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPASS_MONITOR_", "VERL_"))}
    for phase in ("first", "resume"):
        command = [sys.executable, script, str(run_dir), "--model", str(tmp_path / "model"), "--ckpt", str(ckpt),
                   "--phase", phase, "--read", read, "--world-size", str(world_size)]
        ranks = [
            subprocess.Popen([*command, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for r in range(world_size)
        ]
        outputs = [p.communicate(timeout=600) for p in ranks]
        for p, (stdout, stderr) in zip(ranks, outputs):
            assert p.returncode == 0, stderr[-4000:]
        per_rank = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
        assert all(r["patched"] for r in per_rank)
        assert len({json.dumps(r["metrics"]) for r in per_rank}) == 1  # every rank saw the same snapshots
        seen[phase] = per_rank[0]
    if world_size > 1:
        assert seen["resume"]["local_rows"]["model.layers.0.mlp.up_proj.weight"] == 64 // world_size  # really sharded
    assert seen["first"]["monitor_step"] == 6 and seen["resume"]["monitor_step"] == 8
    expected = "fsdp2" if read == "auto" and core_supports_sharding() else "plain"
    assert seen["first"]["monitor_sharding"] == seen["resume"]["monitor_sharding"] == expected
    assert json.loads((ckpt / "compass_monitor.json").read_text())["step"] == 4

    run = open_run(run_dir)
    assert run.status == "finished"
    assert run.steps.tolist() == [2, 4, 6, 8]
    resumed = [e for e in run.commit["history"] if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 4 and resumed[0]["dropped"] == 1
    # the redone step 6 saw the same data and weights as the crashed run's step 6
    assert seen["resume"]["metrics"][0] == seen["first"]["metrics"][2]
    # scalars that reached verl's metrics equal the store's
    stats = group_stats(run, everything_linear)
    logged = seen["first"]["metrics"][:2] + seen["resume"]["metrics"]
    for index, metrics in enumerate(logged):
        for key, value in scalars(stats, index=index).items():
            assert metrics[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
    # the last mask is the final weights against the original W0 (not the checkpoint's weights)
    initial = load_file(tmp_path / "model" / "model.safetensors")
    final = torch.load(tmp_path / "ckpt" / "final_bf16.pt")
    for p in run.params:
        direct = (final[p.name] != initial[p.name].to(torch.bfloat16)).numpy()
        assert (run.mask(p.name, -1) == direct).all(), p.name
