"""``python kill_during_save.py N SCRIPT ARGS...``: run SCRIPT, SIGKILL this process right after
it wrote its weights shard during the N-th checkpoint save (the save is then half done)."""

import os
import runpy
import signal
import sys

import ramda_ds.training.run_checkpoint as run_checkpoint

kill_at, script = int(sys.argv[1]), sys.argv[2]
real_write_shard, saves = run_checkpoint.write_shard, []


def write_then_die(*args, **kwargs):
    real_write_shard(*args, **kwargs)
    saves.append(1)
    if len(saves) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


run_checkpoint.write_shard = write_then_die
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
