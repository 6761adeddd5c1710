"""Monitor TRL's GRPOTrainer with one line (CPU, about a minute, nothing downloaded).

    python examples/trl_grpo.py runs/grpo
    compass-monitor summary runs/grpo

A toy verifiable task (single-digit sums, reward 1 for the right first
character) on a tiny random Llama with a character tokenizer, so that it runs
offline; with a real model, pass ``model="Qwen/Qwen2.5-0.5B-Instruct"`` and its
tokenizer as usual. ``watch(trainer, ...)`` is the one line: GRPOTrainer is a
transformers Trainer, so the monitor's scalars land in the same log records
as GRPO's reward and KL metrics.
"""

from __future__ import annotations

import sys

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from compass_monitor import MonitorConfig
from compass_monitor.integrations.hf import watch


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"0123456789+= "])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def correct_sum(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """Verifiable reward: 1 if the completion starts with the right sum, 0.2 for any digit, else 0."""
    return [1.0 if c.startswith(a) else 0.2 if c[:1].isdigit() else 0.0 for c, a in zip(completions, answer)]


def main(run_dir: str) -> None:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    prompts = Dataset.from_list([{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)])
    args = GRPOConfig(
        output_dir=f"{run_dir}-out",
        max_steps=20,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=2,
        learning_rate=5e-3,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=correct_sum, args=args, train_dataset=prompts, processing_class=tokenizer)
    watch(trainer, run_dir, config=MonitorConfig(every_n_steps=5, principal_rank=16), log_groups=["all_linear"])
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/grpo")
