"""A tiny randomly initialised Llama saved with ``save_pretrained`` (no download), the model of the
README's fine-tuning and Trainer examples: ``python -m ramda_ds.training.tiny_model runs/tiny-llama``.

2 layers, hidden 64, 256 FFN neurons and 4 heads (2 K/V heads) per layer, vocabulary 2000
(380k parameters), with its tokenizer: a byte-level BPE of 2000 tokens trained on the training
part of the default corpus (Python's bundled docs, :func:`ramda_ds.training.data.default_corpus`),
saved as ``tokenizer.json``, so that ``AutoTokenizer.from_pretrained(DIR)`` loads it (no custom
code, no sentencepiece). Both are deterministic: the same files on every machine.
"""

from __future__ import annotations

import sys
import tempfile


def save_tiny_llama(path: str, seed: int = 0, tokenizer: bool = True) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a 1.5 MB file
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    if tokenizer:
        from .data import default_corpus, train_bpe_tokenizer

        print(f"training a {cfg.vocab_size}-token BPE tokenizer on Python's bundled docs for "
              f"{path}", file=sys.stderr)
        with tempfile.TemporaryDirectory() as d:
            train_file, _ = default_corpus(d)
            train_bpe_tokenizer(train_file, cfg.vocab_size).save_pretrained(path)
    return path


if __name__ == "__main__":
    print(save_tiny_llama(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-llama"))
