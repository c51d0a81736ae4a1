"""structured_weights: the model computes with RAMDA's Ŵ inside the block and with W, bitwise,
after it (1 process; 2-rank ZeRO-3 and FSDP2 runs are in test_finetune_llm.py)."""

import copy

import pytest
import torch

from ramda_ds.optim import RAMDA
from ramda_ds.param_groups import build_param_groups
from ramda_ds.sharding.gather import gather_full_state
from ramda_ds.training.structured import has_structured, structured_weights, weights_are_structured


def trained(keep_structured=True, milestones=(), steps=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = RAMDA(build_param_groups(model, "group_lasso", lam=0.05), lr=0.05, momentum=0.1,
                milestones=milestones, keep_structured=keep_structured)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt, x


def test_swap_computes_with_structured_and_restores_W_bitwise():
    model, opt, x = trained()
    W = {n: p.detach().clone() for n, p in model.named_parameters()}
    hat = {n: t["structured"] for n, t in gather_full_state(opt).items()}
    reference = copy.deepcopy(model)
    reference.load_state_dict(hat)  # an independent model holding Ŵ
    assert not weights_are_structured(opt)
    with torch.no_grad():
        dense = model(x)
        with structured_weights(opt):
            inside = model(x)
            assert all(torch.equal(p, hat[n]) for n, p in model.named_parameters())
        after = model(x)
    assert torch.equal(inside, reference(x)) and not torch.equal(inside, dense)
    assert torch.equal(after, dense)
    assert all(torch.equal(p, W[n]) for n, p in model.named_parameters())  # bitwise W
    zero_cols = (hat["0.weight"] == 0).all(dim=0)
    assert zero_cols.any() and not (W["0.weight"][:, zero_cols] == 0).all()  # W ≠ Ŵ for real


def test_restored_even_when_the_block_raises():
    model, opt, _ = trained()
    W = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError), structured_weights(opt):
        raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), W))


def test_equal_once_c_reached_one_and_refused_without_structured_state():
    model, opt, _ = trained(milestones=(2,), steps=2 + 100)  # c = min(0.1·√i, 1) = 1 at i = 100
    assert weights_are_structured(opt) and has_structured(opt)
    _, plain, _ = trained(keep_structured=False, steps=1)
    assert not has_structured(plain)
    with pytest.raises(ValueError, match="keep_structured"), structured_weights(plain):
        pass
