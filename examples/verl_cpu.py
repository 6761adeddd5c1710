"""verl's actor training worker on the CPU, monitored by the compass-monitor verl plugin.

In a real verl run nothing but the environment changes::

    pip install 'compass-monitor[verl]'
    COMPASS_MONITOR_RUN_DIR=runs/grpo COMPASS_MONITOR_CONFIG='{"every_n_steps": 10}' \
        python -m verl.trainer.main_ppo algorithm.adv_estimator=grpo ...   # on one GPU
    compass-monitor summary runs/grpo

That needs a GPU, Ray and a rollout engine. This script runs the part the
plugin hooks, verl's own ``TrainingWorker`` with its FSDP2 engine, on the CPU:
a tiny random Llama, SFT-style updates of two mini-batches each (two optimizer
steps per update), a checkpoint, a crash, and a resume from the checkpoint::

    make .venv-verl/.installed                     # verl 0.9 needs its own environment (it pins transformers<5.11)
    .venv-verl/bin/python examples/verl_cpu.py runs/verl
    .venv-verl/bin/python examples/verl_cpu.py runs/verl2 --world-size 2   # FSDP2 shards the actor over two gloo ranks
    .venv/bin/compass-monitor summary runs/verl

verl 0.9 ships no CPU platform, so the script registers one (device "cpu",
gloo, memory statistics 0) and asks verl's engine registry for the FSDP engine
it registers for CUDA (``VERL_ENGINE_DEVICE``). Everything else is verl's code:
``TrainingWorker.train_mini_batch`` -> ``train_batch`` -> ``FSDPEngineWithLMHead``
(FSDP2 on a one-rank gloo group) -> ``optimizer_step``. The plugin is loaded by
verl itself, through the ``verl.plugins`` entry point, when ``verl`` is imported.

tests/test_integration_verl.py runs the two phases one by one:
``python examples/verl_cpu.py RUN_DIR --model MODEL_DIR --ckpt CKPT_DIR --phase first|resume``;
"first" runs 3 updates (optimizer steps 1..6) with a checkpoint after the 2nd and
exits without closing the monitor (a crash); "resume" loads the checkpoint and runs
2 more updates (steps 5..8). Each prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial

import argparse
import subprocess
from pathlib import Path

_parser = argparse.ArgumentParser(description="verl's TrainingWorker on the CPU with the compass-monitor plugin")
_parser.add_argument("run_dir", nargs="?", default="runs/verl")
_parser.add_argument("--model", help="a Hugging Face model directory (default: a tiny random Llama made here)")
_parser.add_argument("--ckpt", help="checkpoint directory (default: <run_dir>-work/ckpt/actor)")
_parser.add_argument("--phase", choices=("first", "resume"), help="run one phase only (default: both, in two processes)")
_parser.add_argument("--read", choices=("auto", "module", "export"), default="auto", help="how the plugin reads the weights")
_parser.add_argument("--world-size", type=int, default=1, help="training ranks (FSDP2 shards the actor over them)")
_parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
_options = _parser.parse_args()
RUN_DIR = _options.run_dir
MODEL_DIR = _options.model or os.path.join(f"{RUN_DIR}-work", "model")
CKPT_DIR = _options.ckpt or os.path.join(f"{RUN_DIR}-work", "ckpt", "actor")
PHASE = _options.phase
os.environ.update(
    VERL_PLATFORM="cpu",
    VERL_ENGINE_DEVICE="cuda",
    RANK=str(_options.rank),
    WORLD_SIZE=str(_options.world_size),
    LOCAL_RANK=str(_options.rank),
    MASTER_ADDR="127.0.0.1",
    MASTER_PORT="29511",
    COMPASS_MONITOR_RUN_DIR=RUN_DIR,
    COMPASS_MONITOR_CONFIG=json.dumps({"every_n_steps": 2, "principal_rank": 4}),
    COMPASS_MONITOR_VERL_READ=_options.read,
)

import torch  # noqa: E402
from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402  (imports verl: loads the plugin)
from verl.plugin.platform.platform_manager import PlatformRegistry  # noqa: E402


class _CPUDeviceModule:
    """torch.cpu plus the CUDA-only statistics verl reads (0 on the CPU)."""

    def __getattr__(self, name):
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name == "mem_get_info":
            return lambda *a, **k: (0, 0)
        if "memory" in name:
            return lambda *a, **k: 0
        if name in ("get_rng_state", "set_rng_state"):
            return getattr(torch, name)
        if name == "get_device_name":
            return lambda *a, **k: "CPU"
        if name in ("empty_cache", "reset_peak_memory_stats", "set_device", "manual_seed", "manual_seed_all"):
            return lambda *a, **k: None
        raise AttributeError(name)


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "none")
    device_module = property(lambda self: _CPUDeviceModule())

    def is_available(self): return True
    def is_platform_available(self, use_smi_check=False): return True
    def current_device(self): return "cpu"
    def device_count(self): return 1
    def set_device(self, device_index): pass
    def synchronize(self, device_index=None): pass
    def manual_seed(self, seed): torch.manual_seed(seed)
    def manual_seed_all(self, seed): torch.manual_seed(seed)
    def set_allocator_settings(self, settings): pass
    def empty_cache(self): pass
    def get_device_capability(self, device_index=0): return None, None
    def communication_backend_name(self): return "gloo"
    def visible_devices_envvar(self): return "CUDA_VISIBLE_DEVICES"
    def nvtx_range(self, msg): return __import__("contextlib").nullcontext()
    def profiler_start(self): pass
    def profiler_stop(self): pass
    def ray_resource_name(self): return "CPU"
    def ray_noset_envvars(self): return []
    def is_ipc_supported(self): return False
    def cudart(self): return None


def both_phases() -> None:
    """Make a tiny model, then run the two phases as separate processes (a crash between them)."""
    if not os.path.isdir(MODEL_DIR):
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"0123456789+=abcdefghij "])}
        core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        core.decoder = decoders.Fuse()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        LlamaForCausalLM(config).save_pretrained(MODEL_DIR)
        tokenizer.save_pretrained(MODEL_DIR)
    Path(CKPT_DIR).mkdir(parents=True, exist_ok=True)
    for phase in ("first", "resume"):
        Path(f"{CKPT_DIR}.pg-{phase}").unlink(missing_ok=True)  # a rendezvous file left by an earlier run would hang the ranks
    for phase in ("first", "resume"):
        command = [sys.executable, __file__, RUN_DIR, "--model", MODEL_DIR, "--ckpt", CKPT_DIR, "--phase", phase,
                   "--read", _options.read, "--world-size", str(_options.world_size)]
        ranks = [subprocess.Popen([*command, "--rank", str(r)]) for r in range(_options.world_size)]
        if any(p.wait() != 0 for p in ranks):
            raise SystemExit(f"phase {phase} failed")


def main() -> None:
    from verl.trainer.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.dataset_utils import DatasetPadMode, SFTTensorCollator
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig
    from verl.workers.utils.losses import sft_loss

    rank, world_size = _options.rank, _options.world_size
    # file:// takes an absolute path: a relative one (runs/verl-work/...) reads as host "runs" (DistStoreError).
    rendezvous = Path(f"{CKPT_DIR}.pg-{PHASE}").resolve()
    rendezvous.parent.mkdir(parents=True, exist_ok=True)
    torch.distributed.init_process_group("gloo", init_method=rendezvous.as_uri(), rank=rank, world_size=world_size)
    model_config = HFModelConfig(
        path=MODEL_DIR, use_remove_padding=False, enable_gradient_checkpointing=False,
        override_config={"attn_implementation": "sdpa"},
    )
    config = TrainingWorkerConfig(
        model_type="language_model",
        model_config=model_config,
        engine_config=FSDPEngineConfig(strategy="fsdp2", micro_batch_size_per_gpu=2, use_dynamic_bsz=False),
        optimizer_config=FSDPOptimizerConfig(lr=1e-3, total_training_steps=20, clip_grad=1.0),
        checkpoint_config=CheckpointConfig(),
    )
    worker = TrainingWorker(config)
    worker.reset()
    worker.set_loss_fn(partial(sft_loss, config=None))
    tokenizer = model_config.tokenizer

    def batch(seed: int):
        generator = torch.Generator().manual_seed(seed)
        items = []
        for _ in range(8):
            n = int(torch.randint(5, 12, (1,), generator=generator))
            ids = torch.randint(4, len(tokenizer), (n,), generator=generator)
            items.append({"input_ids": ids, "position_ids": torch.arange(n), "loss_mask": torch.ones(n, dtype=torch.long)})
        meta = {
            "use_remove_padding": False, "use_dynamic_bsz": False, "max_token_len_per_gpu": 4096,
            "micro_batch_size_per_gpu": 2, "temperature": 1.0, "global_batch_size": 8,
            "pad_mode": DatasetPadMode.NO_PADDING, "pad_token_id": tokenizer.pad_token_id,
            "num_mini_batch": 2, "epochs": 1,  # two optimizer steps per update
        }
        return tu.get_tensordict(tensor_dict=SFTTensorCollator(DatasetPadMode.NO_PADDING)(items), non_tensor_dict=meta)

    seen = {"rank": rank, "patched": bool(getattr(TrainingWorker, "_compass_patched", False)), "metrics": []}
    updates = range(3) if PHASE == "first" else range(2, 4)
    if PHASE == "resume":
        worker.load_checkpoint(CKPT_DIR)
    for update in updates:
        metrics = tu.get(worker.train_mini_batch(batch(update * world_size + rank)), "metrics")
        seen["metrics"].append({k: v for k, v in metrics.items() if k.startswith("compass/all_linear/")})
        if PHASE == "first" and update == 1:
            worker.save_checkpoint(CKPT_DIR, global_step=2)
    session = worker._compass_session
    seen["monitor_step"] = session.monitor.step
    seen["monitor_sharding"] = session.monitor.probe.layout.kind
    if PHASE == "resume":
        session.close()  # on every rank: the last steps' collectives
        weights = {k: v.full_tensor().to(torch.bfloat16) for k, v in worker.engine.module.state_dict().items()}
        seen["local_rows"] = {k: v.to_local().shape[0] for k, v in worker.engine.module.state_dict().items() if v.dim() == 2}
        if rank == 0:
            torch.save(weights, os.path.join(CKPT_DIR, "..", "final_bf16.pt"))
    else:
        session.monitor.flush()  # what the writer had committed when the process died
    print(json.dumps(seen), flush=True)
    torch.distributed.barrier()
    os._exit(0)  # no clean shutdown: the "first" phase leaves its store as a crash would


if __name__ == "__main__":
    if PHASE is None:
        both_phases()
    else:
        main()
