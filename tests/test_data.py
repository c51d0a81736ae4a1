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
