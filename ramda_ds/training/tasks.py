"""Language-model tasks for :func:`ramda_ds.training.loop.train`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import data
from .world import world_sum_


class StreamTask:
    """Next-token prediction on a token stream cut into ``global_batch`` contiguous rows; rank r
    reads rows r, r+W, ... and consecutive segments of ``seq_len`` tokens.

    ``forward(model, x, memory) -> (logits, memory)``: Transformer-XL carries its segment memory
    across steps (and across a resume, re-dealt to the new ranks); a plain causal LM returns None.
    ``eval_tokens > 0`` evaluates on the first ``eval_tokens`` validation tokens only (the same
    tokens at any world size with the same global batch).
    """

    def __init__(self, acc, train_ids, valid_ids, batch_size: int, seq_len: int, forward,
                 eval_tokens: int = 0):
        self.acc, self.seq_len, self.forward = acc, seq_len, forward
        self.rank, self.world = acc.process_index, acc.num_processes
        self.global_batch = batch_size * self.world
        self.streams = data.lm_streams(train_ids, self.global_batch)[self.rank::self.world]
        if eval_tokens > 0:
            valid_ids = valid_ids[:eval_tokens + 1]  # + 1: the last target
        vstreams = data.lm_streams(valid_ids, self.global_batch)
        self.valid_tokens = int(vstreams.shape[1] - 1) * self.global_batch  # predicted per eval
        self.vstreams = vstreams[self.rank::self.world]
        self.per_epoch = math.ceil((self.streams.shape[1] - 1) / seq_len)
        self.mems = None

    def _loss(self, model, x, y, mems):
        logits, mems = self.forward(model, x.to(self.acc.device), mems)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               y.to(self.acc.device).reshape(-1))
        return loss, mems

    def batches(self, position: int):
        skip = position % self.per_epoch
        while True:
            for j, (x, y) in enumerate(data.segments(self.streams, self.seq_len)):
                if j < skip:
                    continue
                if j == 0:
                    self.mems = None  # a new pass over the stream
                yield x, y
            skip = 0

    def loss(self, model, batch):
        loss, self.mems = self._loss(model, *batch, self.mems)
        return loss

    def evaluate(self, model) -> dict:
        """Validation perplexity: exp of the token-weighted mean loss over every rank's rows."""
        model.eval()
        tot, n, mems = 0.0, 0, None
        with torch.no_grad():
            for x, y in data.segments(self.vstreams, self.seq_len):
                loss, mems = self._loss(model, x, y, mems)
                tot, n = tot + loss.item() * y.numel(), n + y.numel()
        t = world_sum_(torch.tensor([tot, n], dtype=torch.float64, device=self.acc.device))
        model.train()
        mean = t[0].item() / t[1].item()
        return dict(valid_ppl=math.inf if mean > 709.78 else math.exp(mean))  # overflow: inf

    def meta(self) -> dict:
        return dict(global_batch=self.global_batch, seq_len=self.seq_len,
                    train_tokens=int(self.streams.shape[1]) * self.global_batch)

    def carry(self) -> dict:
        return {f"mems/{i}": m for i, m in enumerate(self.mems or [])}

    def restore(self, saved: list[dict], position: int) -> None:
        """Row j of the global batch was row j // W_old of rank j % W_old."""
        if "mems/0" not in saved[0]:
            self.mems = None
            return
        old = len(saved)
        self.mems = []
        for i in range(sum(k.startswith("mems/") for k in saved[0])):
            parts = [s[f"mems/{i}"] for s in saved]
            full = torch.empty((self.global_batch, *parts[0].shape[1:]), dtype=parts[0].dtype)
            for r, part in enumerate(parts):
                full[r::old] = part
            self.mems.append(full[self.rank::self.world].to(self.acc.device))
