"""A transformers Trainer on a model sharded with FSDP2 (tests/test_integration_hf.py, run in its own process).

    python tests/_hf_fsdp2_run.py OUT_DIR

One rank, a CPU gloo group: the parameters are DTensors, as under FSDP2. The
Trainer's own FSDP needs GPUs (on the CPU, ``TrainingArguments(fsdp=...)``
trains as DDP), so the model is sharded by hand before the Trainer sees it;
accelerate's process-wide state is created first, as a plain single-process
run, so that it does not wrap the sharded model in DDP. Its own process for
that state. Prints one JSON line: "refused" with the message, or "trained"
with the log history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from datasets import Dataset
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_lm import addition_prompts, tiny_llama, tiny_tokenizer  # noqa: E402

from compass_monitor import MonitorConfig  # noqa: E402
from compass_monitor.integrations.hf import watch  # noqa: E402


def main(out: Path) -> None:
    from accelerate import PartialState

    PartialState(cpu=True)  # a single-process accelerate state, before the process group exists
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    dist.init_process_group("gloo", init_method=f"file://{out / 'pg'}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = tokenizer([r["prompt"] + r["answer"] for r in addition_prompts(32)])["input_ids"]
    args = TrainingArguments(
        output_dir=str(out / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=100, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    watch(trainer, out / "run", config=MonitorConfig(every_n_steps=2, principal_rank=4))
    trainer.train()
    result = {"trained": trainer.state.log_history}
    dist.destroy_process_group()
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
