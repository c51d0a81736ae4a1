"""What a Trainer script needs on top of ``TrainingArguments`` to run the same on GPUs and on CPUs.

* :func:`cpu_friendly` (call before ``TrainingArguments``), with no CUDA: DeepSpeed's CPU
  accelerator would JIT-build a shared-memory comm op (~30 s, /dev/shm leftovers) that gloo does
  not need; it is skipped (results identical). A multi-process launch without DeepSpeed gets
  ``ACCELERATE_USE_CPU=true``: otherwise accelerate sees no distributed setup (``fsdp2.yaml`` on
  CPU), does not gather across ranks, and the Trainer's loss normalization doubles the gradients.
  Pass ``--ddp_backend gloo`` on CPU.
* :func:`shard_fsdp2_if_needed` (call after loading the model): accelerate applies its FSDP2 plugin
  only on GPU backends and silently runs unsharded on CPU, so there ``fully_shard`` is applied
  here (per decoder layer, then the root) when the launch asked for FSDP
  (``accelerate launch --config_file configs/accelerate/fsdp2.yaml``); on GPUs accelerate does it.
"""

from __future__ import annotations

import os

import torch


def cpu_friendly() -> None:
    if not torch.cuda.is_available():
        import importlib

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and \
                os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")

        try:
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda *a, **k: None
        except ImportError:  # pragma: no cover - DeepSpeed not installed
            pass


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def shard_fsdp2_if_needed(model, precision: str = "no") -> bool:
    """``fully_shard`` the model when FSDP was asked for and accelerate will not do it (CPU);
    returns whether it did. The Trainer then uses the sharded model as it is."""
    import torch.distributed as dist

    if not fsdp_requested() or torch.cuda.is_available() or not dist.is_initialized():
        return False
    from ..training.launch import shard_fsdp2

    blocks = getattr(getattr(model, "model", None), "layers", None) or \
        getattr(getattr(model, "transformer", None), "h", [])
    shard_fsdp2(model, blocks, precision)
    model._is_accelerate_prepared = True  # accelerate must not wrap it in DDP on top
    return True
