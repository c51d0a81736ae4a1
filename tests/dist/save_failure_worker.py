"""One rank of ``torchrun --nproc-per-node 2 save_failure_worker.py OUT``: FSDP2-sharded RAMDA
saves run checkpoints while one write at a time fails on one rank, as on a full disk (the
safetensors writer raises SafetensorError; the text writes OSError ENOSPC). Each rank writes
OUT/result{rank}.json: per case the CheckpointError message, the seconds it took and what
``latest`` names afterwards; then a save that works, and a load of it."""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

sys.path.insert(0, os.path.dirname(__file__))
from common import batches, loss_fn, make_model, make_optimizer  # noqa: E402

import ramda_ds.checkpoint as shard_module  # noqa: E402
from ramda_ds.checkpoint import CheckpointError  # noqa: E402
from ramda_ds.sharding import attach  # noqa: E402
from ramda_ds.training import run_checkpoint  # noqa: E402
from ramda_ds.training.world import exit_process  # noqa: E402

OUT = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
FULL = "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space " \
       "left on device\" })"


def build():
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for m in (model.conv, model.fc1, model.head):
        fully_shard(m)
    fully_shard(model)
    opt = make_optimizer("RAMDA", model)
    attach(opt, model)
    return model, opt


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()


def broken(where):
    """Replace one writer by one that fails; returns the undo."""
    def no_space(*a, **k):
        raise SafetensorError(FULL)
    if where in ("weights", "trainer"):
        module = shard_module if where == "weights" else run_checkpoint
        real = module.save_file
        module.save_file = no_space
        return lambda: setattr(module, "save_file", real)
    real = run_checkpoint._write_tmp
    name = {"manifest": run_checkpoint.MANIFEST, "latest": run_checkpoint.LATEST}[where]

    def write(path, text):
        if path.name == name:
            raise OSError(28, "No space left on device", str(path))
        return real(path, text)
    run_checkpoint._write_tmp = write
    return lambda: setattr(run_checkpoint, "_write_tmp", real)


model, opt = build()
data = batches()
train(model, opt, data[:1])
ck = run_checkpoint.RunCheckpointer(OUT / "checkpoints")
ck.save(1, opt, dict(position=1), run_checkpoint.rng_state())
train(model, opt, data[1:2])
result = {}
for where, at in [("weights", 1), ("weights", 0), ("trainer", 1), ("manifest", 0), ("latest", 0)]:
    undo = broken(where) if rank == at else (lambda: None)
    t0 = time.perf_counter()
    try:
        ck.save(2, opt, dict(position=2), run_checkpoint.rng_state())
        outcome = "saved"
    except CheckpointError as e:
        outcome = str(e)
    undo()
    dist.barrier()  # rank 0 removes the half-written save after raising
    result[f"{where}@{at}"] = outcome
    result[f"{where}@{at} seconds"] = round(time.perf_counter() - t0, 1)
    result[f"{where}@{at} latest"] = (OUT / "checkpoints" / "latest").read_text()
    assert not list((OUT / "checkpoints").glob("*.partial")), where
    dist.barrier()  # before rank 0's next save makes a new .partial
ck.save(2, opt, dict(position=2), run_checkpoint.rng_state())
result["then"] = (OUT / "checkpoints" / "latest").read_text()
model2, opt2 = build()
ck.load(ck.resolve("auto"), opt2).apply()
for p, q in zip(model.parameters(), model2.parameters()):
    assert torch.equal(p.to_local(), q.to_local())
(OUT / f"result{rank}.json").write_text(json.dumps(result, indent=1))
dist.barrier()
exit_process(0)  # no gloo teardown race at exit (see exit_process)
