"""Tokenizers a Hugging Face user can load: a run's SentencePiece model as ``tokenizer.json``
(used by the training scripts and by export, which sits below training)."""

from __future__ import annotations


def sentencepiece_as_hf(model_file: str):
    """The SentencePiece unigram model a run trained (:func:`train_tokenizer`), rebuilt as a
    ``tokenizers`` Unigram model with the same pieces and scores, NFKC normalization and the
    ``▁`` word prefix, as a ``PreTrainedTokenizerFast`` (``tokenizer.json``, which
    ``AutoTokenizer`` loads without custom code). Its ids equal SentencePiece's on ordinary text
    (tested on the default corpus); ``bos``/``eos``/``unk`` keep their ids."""
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    special = {}
    for key, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
        if i >= 0:
            special[key] = sp.id_to_piece(i)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)
