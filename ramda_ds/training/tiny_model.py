"""A tiny randomly initialised Llama saved with ``save_pretrained`` (no download), the model of the
README's fine-tuning example: ``python -m ramda_ds.training.tiny_model runs/tiny-llama``.

2 layers, hidden 64, 256 FFN neurons and 4 heads (2 K/V heads) per layer, vocabulary 2000
(380k parameters); no tokenizer files, so ``finetune_llm.py`` trains a SentencePiece model on the
corpus.
"""

from __future__ import annotations

import sys


def save_tiny_llama(path: str, seed: int = 0) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


if __name__ == "__main__":
    print(save_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llama"))
