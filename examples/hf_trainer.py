"""Monitor a Hugging Face Trainer run with one line (CPU, under a minute, nothing downloaded).

    python examples/hf_trainer.py runs/hf
    compass-monitor summary runs/hf

``watch(trainer, run_dir, config=...)`` after building the Trainer is the one
line. The snapshots' scalars (compass/all_linear/sparsity, compass/q/overlap_low,
...) join the Trainer's logs at each snapshot step, so every ``report_to``
integration gets them; here TensorBoard (``runs/hf-out/runs/``) if it is
installed, and the console.

To stay offline the example builds a tiny random Llama and a character
tokenizer; with a real model you would use ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from compass_monitor import MonitorConfig
from compass_monitor.integrations.hf import watch


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"0123456789+= "])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def main(run_dir: str) -> None:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        )
    )
    sums = [f"{a}+{b}={a + b}" for a in range(10) for b in range(10)]
    ids = tokenizer(sums)["input_ids"]
    args = TrainingArguments(
        output_dir=f"{run_dir}-out",
        max_steps=40,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-4,
        logging_steps=10,
        save_strategy="steps",
        save_steps=20,
        report_to="tensorboard" if importlib.util.find_spec("tensorboard") else "none",
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids}),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    watch(trainer, run_dir, config=MonitorConfig(every_n_steps=10, principal_rank=16), log_groups=["all_linear", "q", "down"])
    trainer.train()
    # After a crash, `trainer.train(resume_from_checkpoint=True)` with the same watch(...) line continues the run store.


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/hf")
