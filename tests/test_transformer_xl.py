"""Transformer-XL: causality, segment recurrence equals full-context attention, save/load."""

import pytest
import torch

from ramda_ds.models import TransfoXLConfig, TransfoXLLM


def model(**kw):
    torch.manual_seed(0)
    cfg = TransfoXLConfig(vocab_size=50, n_layer=2, d_model=32, n_head=4, d_head=8, d_inner=64,
                          tgt_len=6, mem_len=6, dropout=0.0, **kw)
    m = TransfoXLLM(cfg).eval()
    with torch.no_grad():  # non-zero position biases so the relative terms matter
        for layer in m.layers:
            layer.attn.r_w_bias.normal_()
            layer.attn.r_r_bias.normal_()
    return m


def test_future_tokens_do_not_change_past_outputs():
    m = model()
    ids = torch.randint(0, 50, (2, 6))
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 50
    a, _ = m(ids)
    b, _ = m(changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_second_segment_with_memory_equals_full_context():
    """With mem_len = segment length, segment 2 sees exactly what it sees in one long pass."""
    m = model()
    ids = torch.randint(0, 50, (2, 12))
    full, _ = m(ids)
    first, mems = m(ids[:, :6])
    second, _ = m(ids[:, 6:], mems)
    torch.testing.assert_close(first, full[:, :6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, full[:, 6:], rtol=1e-5, atol=1e-5)
    alone, _ = m(ids[:, 6:])
    assert not torch.allclose(alone, full[:, 6:], atol=1e-3)  # the memory matters


def test_save_and_load_pretrained_round_trip(tmp_path):
    m = model()
    m.save_pretrained(tmp_path / "txl")
    again = TransfoXLLM.from_pretrained(tmp_path / "txl").eval()
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(m(ids)[0], again(ids)[0])
    assert again.out.weight is again.embed.weight
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransfoXLLM.from_pretrained(tmp_path / "missing")


def test_presets_and_gradients():
    base = TransfoXLConfig.preset("base", vocab_size=267735)
    assert (base.n_layer, base.d_model, base.n_head) == (16, 410, 10)
    with pytest.raises(ValueError, match="preset"):
        TransfoXLConfig.preset("huge", 10)
    m = model()
    m.train()
    ids = torch.randint(0, 50, (2, 7))
    loss, mems = m.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    assert all(not x.requires_grad for x in mems)
