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
