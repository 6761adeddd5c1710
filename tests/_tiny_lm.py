"""A tiny random-init causal LM and a character tokenizer, built locally (nothing from the hub).

Shared by the Hugging Face / TRL integration tests.
"""

from __future__ import annotations

import torch

ALPHABET = list("0123456789+-=?abcdefghijklmnopqrstuvwxyz ")


def tiny_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (one token per character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + ALPHABET)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(tokenizer, *, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A 2-layer Llama-shaped causal LM with random weights (q/k/v/o/gate/up/down projections)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def addition_prompts(n: int, *, seed: int = 0) -> list[dict[str, str]]:
    """``{"prompt": "3+4=", "answer": "7"}`` rows with single-digit sums."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = torch.randint(0, 5, (2,), generator=generator).tolist()
        rows.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return rows
