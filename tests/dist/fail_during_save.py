"""``python fail_during_save.py RANK N SCRIPT ARGS...``: run SCRIPT; on rank RANK, the weights
write of the N-th checkpoint save fails the way safetensors fails on a full disk."""

import os
import runpy
import sys

from safetensors import SafetensorError

import ramda_ds.checkpoint as shard_module

rank, fail_at, script = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real_save_file, saves = shard_module.save_file, []


def save_file(*args, **kwargs):
    saves.append(1)
    if len(saves) == fail_at and int(os.environ.get("RANK", "0")) == rank:
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")
    return real_save_file(*args, **kwargs)


shard_module.save_file = save_file
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
