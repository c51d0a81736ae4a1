"""``torchrun --nproc-per-node 2 reshard_worker.py BACKEND save|load DIR OUT``.

save: train STEPS_A steps, write the model (full, rank 0) and the optimizer state (each rank its
slices) to DIR, train STEPS_B more and save the gathered result to OUT.
load: start from DIR's model and optimizer state (written at any world size), train STEPS_B
steps and save the gathered result to OUT.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import worker  # noqa: E402  (build(), backend set-up)
from common import batches  # noqa: E402

from ramda_ds.checkpoint import load_optimizer_state, save_optimizer_state  # noqa: E402
from ramda_ds.sharding.gather import gather_full_state  # noqa: E402
from ramda_ds.training.world import exit_process  # noqa: E402

STEPS_A, STEPS_B = 3, 2
NAMES = ("RAMDA", "ProxGen")


def main():
    backend, mode, ckpt, out = sys.argv[1:5]
    worker.BACKEND = backend
    worker.init_distributed(backend)
    data, results = batches(), {}
    for name in NAMES:
        d = os.path.join(ckpt, name)
        if mode == "load":
            os.environ["RAMDA_TEST_INIT"] = os.path.join(d, "model.pt")
        step, opt, _, _ = worker.build(name)
        if mode == "save":
            for x, y in data[:STEPS_A]:
                step(x, y)
            full = gather_full_state(opt)
            if dist.get_rank() == 0:
                os.makedirs(d, exist_ok=True)
                torch.save({n: t["param"] for n, t in full.items()}, os.path.join(d, "model.pt"))
            save_optimizer_state(opt, d)
        else:
            load_optimizer_state(opt, d)
        for x, y in data[STEPS_A:STEPS_A + STEPS_B]:
            step(x, y)
        results[name] = gather_full_state(opt)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    exit_process(0)  # no gloo teardown race at exit (see exit_process)


if __name__ == "__main__":
    main()
