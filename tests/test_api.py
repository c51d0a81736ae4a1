"""The front door: what ``import ramda_ds`` offers, and the typed optimizer factory that the
command line and the Hugging Face Trainer both call."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch.nn as nn

import ramda_ds
from ramda_ds.optim import RAMDA, RMDA, OptimizerConfig, ProxGen, ProxSGD, make_optimizer
from ramda_ds.param_groups import build_param_groups


def test_the_public_api_is_importable_from_the_package():
    for name in ramda_ds.__all__:
        assert getattr(ramda_ds, name) is not None, name
    assert ramda_ds.RAMDA is RAMDA and ramda_ds.make_optimizer is make_optimizer
    from ramda_ds.export import export_run
    assert ramda_ds.export_run is export_run


def test_importing_the_package_does_not_import_transformers_or_deepspeed():
    code = ("import sys, ramda_ds\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'transformers', 'deepspeed', 'accelerate'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name, cls", [("ramda", RAMDA), ("rmda", RMDA), ("proxsgd", ProxSGD),
                                       ("proxgen", ProxGen)])
def test_make_optimizer_builds_what_the_config_names(name, cls):
    net = nn.Linear(4, 3)
    cfg = OptimizerConfig(name=name, lr=0.01, momentum=0.2, milestones=[3, 7], solver="exact",
                          keep_structured=True)
    assert cfg.milestones == (3, 7)
    opt = make_optimizer(cfg, build_param_groups(net, "group_lasso", lam=1e-3))
    assert type(opt) is cls
    g = opt.param_groups[0]
    assert g["lr"] == 0.01 and g["milestones"] == (3, 7)
    if name in ("ramda", "rmda", "proxsgd"):
        assert g["c"] == 0.2
    if name in ("ramda", "proxgen"):
        assert g["solver"] == "exact" and g["backend"] == "torch"
    assert g.get("keep_structured", False) == (name == "ramda")


def test_make_optimizer_refuses_an_unknown_name_and_a_torch_convention_momentum():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        OptimizerConfig(name="adam", lr=0.1)
    with pytest.raises(ValueError, match="looks like torch/MADGRAD's convention"):
        make_optimizer(OptimizerConfig(name="ramda", lr=0.1, momentum=0.9),
                       build_param_groups(nn.Linear(2, 2), "group_lasso", lam=0.0))


def test_the_command_line_goes_through_the_typed_factory():
    from ramda_ds.training.launch import make_optimizer as cli_make_optimizer

    net = nn.Linear(4, 3)
    a = SimpleNamespace(optimizer="ramda", lr=0.05, momentum=0.3, milestones="2,5",
                        solver="pg", backend="torch")
    opt = cli_make_optimizer(a, net, lambda m: build_param_groups(m, "group_lasso", lam=1e-3),
                             keep_structured=True)
    ref = make_optimizer(OptimizerConfig(name="ramda", lr=0.05, momentum=0.3, milestones=(2, 5),
                                         keep_structured=True),
                         build_param_groups(net, "group_lasso", lam=1e-3))
    strip = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
