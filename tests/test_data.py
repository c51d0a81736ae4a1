"""Data loading: local files and ``hf:`` datasets, offline only."""

import pytest

from ramda_ds.training import data


def test_local_dataset_directory_through_the_hf_spec(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text("alpha beta\ngamma\n")
    ds = data.load_lines(f"hf:{d}@train")
    assert list(ds["text"]) == ["alpha beta", "gamma"]


def test_dataset_not_in_the_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        data.load_lines("hf:someone/never-downloaded-corpus")


def test_json_lines_train_a_tokenizer_on_their_text(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join('{"text": "the quick brown fox %d jumps"}' % i for i in range(300)))
    model = data.train_tokenizer(str(f), str(tmp_path / "sp"), 40)
    ids = data.encode(data.load_lines(str(f)), model)
    assert ids.numel() > 300 and "{" not in (tmp_path / "sp.corpus.txt").read_text()


def test_the_tiny_model_ships_a_tokenizer_that_autotokenizer_loads(tmp_path):
    """``python -m ramda_ds.training.tiny_model DIR``: tokenizer.json (byte-level BPE, 2000
    tokens, the same file on every run), loaded by AutoTokenizer with no custom code."""
    from transformers import AutoConfig, AutoTokenizer

    from ramda_ds.training.tiny_model import save_tiny_llama

    save_tiny_llama(str(tmp_path / "a"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")  # no trust_remote_code, no prompt
    cfg = AutoConfig.from_pretrained(tmp_path / "a")
    assert len(tok) == cfg.vocab_size == 2000 and "auto_map" not in cfg.to_dict()
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    text = "def f(x):\n    return x ** 2  # é, 漢字"
    ids = tok(text)["input_ids"]
    assert 0 < len(ids) < len(text) and tok.decode(ids) == text  # byte-level: every text round-trips
    save_tiny_llama(str(tmp_path / "b"))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_a_sentencepiece_model_rebuilt_for_autotokenizer_gives_the_same_ids(tmp_path):
    """What export writes for a run that trained SentencePiece: tokenizer.json with its ids."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    train, valid = data.default_corpus(tmp_path / "c")
    model = data.train_tokenizer(train, str(tmp_path / "sp"), 500)
    data.sentencepiece_as_hf(model).save_pretrained(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_file=model)
    lines = [x for x in open(valid).read().splitlines() if x.strip()]
    same = sum(sp.encode(x) == tok(x)["input_ids"] for x in lines)
    assert same >= 0.99 * len(lines), f"{same} of {len(lines)} lines"
    assert tok.eos_token_id == sp.eos_id()
