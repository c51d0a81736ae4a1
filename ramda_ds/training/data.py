"""Language-model data: local text through HF ``datasets``, a SentencePiece tokenizer, and the
batched token streams Transformer-XL trains on (no download at run time).

The default corpus is the English documentation text that ships with Python
(``pydoc_data.topics``, ~65k words), written once to a local file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..tokenization import sentencepiece_as_hf  # noqa: F401 (the public name here too)


def default_corpus(cache_dir) -> list[str]:
    """Python's bundled pydoc topics as train/valid text files (95% / 5% of the topics)."""
    import pydoc_data.topics as topics

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    train, valid = cache / "pydoc_train.txt", cache / "pydoc_valid.txt"
    if not (train.exists() and valid.exists()):
        docs = [topics.topics[k] for k in sorted(topics.topics)]
        cut = len(docs) * 19 // 20
        train.write_text("\n".join(docs[:cut]))
        valid.write_text("\n".join(docs[cut:]))
    return [str(train), str(valid)]


def load_lines(path: str):
    """A ``datasets`` Dataset with a ``text`` column from a local text/json/parquet file, or from
    ``hf:NAME[:CONFIG][@SPLIT]``: a dataset already in the local HF cache (or a local dataset
    directory), loaded offline — never downloaded."""
    import datasets

    _offline()
    datasets.disable_progress_bars()  # "Generating train split" bars for a local text file
    if path.startswith("hf:"):
        name, _, split = path[3:].partition("@")
        name, _, config = name.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split or "train")
        except Exception as e:  # not cached: the offline error says so
            raise FileNotFoundError(f"dataset {path} is not in the local cache: {e}") from e
    else:
        if not Path(path).exists():
            raise FileNotFoundError(f"data file not found: {path}")
        kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(Path(path).suffix,
                                                                             "text")
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    if "text" not in ds.column_names:
        raise ValueError(f"{path} has no 'text' column (columns: {ds.column_names})")
    return ds


def _offline() -> None:
    """No hub access from here on (the environment variables only count before the import)."""
    import datasets.config
    import huggingface_hub.constants

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    if hasattr(datasets.config, "HF_DATASETS_OFFLINE"):
        datasets.config.HF_DATASETS_OFFLINE = True


def train_tokenizer(source: str, prefix: str, vocab_size: int) -> str:
    """Train a SentencePiece unigram model on the text of ``source`` (anything :func:`load_lines`
    reads); returns the .model path. Reused when it exists."""
    import sentencepiece as spm

    model = f"{prefix}.model"
    if not Path(model).exists():
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        text_file = source
        if source.startswith("hf:") or Path(source).suffix in (".json", ".jsonl", ".parquet"):
            text_file = f"{prefix}.corpus.txt"
            Path(text_file).write_text("\n".join(load_lines(source)["text"]))
        spm.SentencePieceTrainer.train(input=text_file, model_prefix=prefix, vocab_size=vocab_size,
                                       character_coverage=1.0, model_type="unigram",
                                       minloglevel=2, hard_vocab_limit=False)
    return model


def encode(dataset, tokenizer_model: str) -> torch.Tensor:
    """All lines of ``dataset`` as one stream of token ids, an end-of-line id after each line."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    eos = sp.eos_id() if sp.eos_id() >= 0 else 0
    ids = []
    for piece in sp.encode(list(dataset["text"])):
        ids.extend(piece)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def lm_streams(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[batch_size, T]``: the stream cut into batch_size contiguous rows (Transformer-XL style)."""
    n = tokens.numel() // batch_size
    if n < 2:
        raise ValueError(f"{tokens.numel()} tokens are too few for batch size {batch_size}")
    return tokens[: n * batch_size].view(batch_size, n)


def segments(streams: torch.Tensor, tgt_len: int):
    """(input, target) pairs of consecutive segments of ``tgt_len`` tokens."""
    T = streams.shape[1]
    for t in range(0, T - 1, tgt_len):
        L = min(tgt_len, T - 1 - t)
        yield streams[:, t:t + L], streams[:, t + 1:t + 1 + L]


# ---------------------------------------------------------------- Hugging Face tokenizers
SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: Llama's unk / bos / eos


def train_bpe_tokenizer(text_file: str, vocab_size: int):
    """A byte-level BPE tokenizer (the ``tokenizers`` library, GPT-2 style: every text encodes,
    no unknown token needed) trained on ``text_file``, as a ``PreTrainedTokenizerFast`` whose
    ``save_pretrained`` writes ``tokenizer.json``: ``AutoTokenizer`` loads it without custom code
    or sentencepiece. Ids 0-2 are ``<unk>``, ``<s>``, ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([text_file], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIAL[0], bos_token=SPECIAL[1],
                                   eos_token=SPECIAL[2], pad_token=SPECIAL[2])


if __name__ == "__main__":  # python -m ramda_ds.training.data DIR: the default corpus as files
    import sys

    for f in default_corpus(sys.argv[1] if len(sys.argv) > 1 else "runs/corpus"):
        print(f)
