"""Logit distillation from the dense starting model (the teacher), as Minitron recovers.

    L = β · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − β) · CE(z_s, y)

averaged over tokens; ``β = 1`` is pure distillation, ``T`` the temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor | None, beta: float = 1.0,
                 temperature: float = 1.0) -> torch.Tensor:
    V = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, V) / temperature
    t = teacher_logits.float().reshape(-1, V) / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                  reduction="batchmean") * temperature ** 2
    if beta >= 1.0 or targets is None:
        return kl
    ce = F.cross_entropy(student_logits.float().reshape(-1, V), targets.reshape(-1))
    return beta * kl + (1.0 - beta) * ce


def causal_lm_distill_loss(outputs, teacher_logits: torch.Tensor, labels: torch.Tensor,
                           beta: float, temperature: float = 1.0) -> torch.Tensor:
    """The HF form: β·T²·KL on the positions that have a label (``labels != -100``, shifted as
    the model shifts them) + (1 − β)·the model's own loss."""
    s = outputs.logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    keep = labels[:, 1:] != -100
    kl = F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), log_target=True,
                  reduction="batchmean") * temperature ** 2
    return kl if beta >= 1.0 else beta * kl + (1.0 - beta) * outputs.loss


class DistillTask:
    """A causal-LM task whose training loss distils ``teacher`` (evaluation is the task's own:
    plain perplexity). Everything but :meth:`loss` is the wrapped task's."""

    def __init__(self, task, teacher, beta: float = 1.0, temperature: float = 1.0):
        self.task, self.teacher, self.beta, self.temperature = task, teacher, beta, temperature

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        x, y = batch
        dev = self.task.acc.device
        x, y = x.to(dev), y.to(dev)
        logits = model(input_ids=x).logits
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=x).logits
        return distill_loss(logits, teacher_logits, y, self.beta, self.temperature)


def make_teacher(model, acc, precision: str, backend: str, blocks_of=None, load=None):
    """A frozen copy of the starting model; returns (teacher, its parameters held per rank).

    Replicated where the student's parameters are (single process, DDP, ZeRO-1/2); sharded by
    FSDP2 (``fully_shard`` per block and the root, on the run's process group) where the
    student's are sharded (FSDP2, ZeRO-3), so a rank holds 1/N of it between forwards. A student
    that ZeRO-3 partitioned as it loaded cannot be copied: ``load()`` reads the model again,
    outside DeepSpeed's partitioning context."""
    import copy

    if any(getattr(p, "ds_numel", p.numel()) != p.numel() for p in model.parameters()):
        from transformers.integrations import deepspeed as hf_ds

        saved = hf_ds._hf_deepspeed_config_weak_ref  # from_pretrained partitions while it is set
        hf_ds.unset_hf_deepspeed_config()
        try:
            teacher = load().eval()
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = saved
    else:
        teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    total = sum(p.numel() for p in teacher.parameters())
    if precision == "bf16":
        teacher = teacher.to(torch.bfloat16)
    teacher = teacher.to(acc.device)
    if backend in ("fsdp2", "deepspeed-zero3") and acc.num_processes > 1:
        from torch.distributed.fsdp import fully_shard

        for block in (blocks_of(teacher) if blocks_of else []):
            fully_shard(block)
        fully_shard(teacher)
        return teacher, -(-total // acc.num_processes)
    return teacher, total
