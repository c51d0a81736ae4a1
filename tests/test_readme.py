"""Every shell command of README.md runs as written, in order, in a directory laid out like a fresh
clone (the repository's files linked in, ``.venv`` the environment running this test), on the
shipped tiny models — with fewer steps: the arguments in ``SHORTER`` are appended to a command
(argparse keeps the last value of a flag; ``make demo*`` pass ``ARGS`` on). A command that cannot
run here is in ``ELSEWHERE`` with the test that runs it instead; a README command in neither list
fails the test, so a new command cannot slip in untested.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from test_sharded import ROOT

STEPS = ["--steps", "6", "--eval_every", "3"]
HF_STEPS = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "2"]
# (a fragment of the command, what is appended); the first match applies
SHORTER = [
    ("make demo-finetune", ["ARGS=--steps 6"]),
    ("make demo", ["ARGS=--steps 6 --eval_every 3"]),
    ("--resume auto", ["--steps", "8"]),  # continues the 6-step run above to step 8
    ("launch/train_lm.py", STEPS),
    ("launch/finetune_llm.py --help", []),
    ("launch/finetune_llm.py", ["--steps", "6"]),
    ("launch/hf_trainer_example.py", HF_STEPS),
]
ELSEWHERE = {
    "make test": "the test suite itself",
    "configs/accelerate/zero2.yaml launch/train_lm.py":
        "tests/test_train_lm.py::test_deepspeed_zero2_two_processes_through_accelerate",
}
LINKED = ("Makefile", "pyproject.toml", "ramda_ds", "launch", "configs", "bench")


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks: continuation lines joined, a quoted string spanning
    lines kept whole, comments dropped; each re-quoted by shlex."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        buf = ""
        for line in block.splitlines():
            buf += line + "\n"
            if buf.rstrip().endswith("\\"):
                continue
            try:
                words = shlex.split(buf.replace("\\\n", " "), comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if words:
                out.append(shlex.join(words))
            buf = ""
    return out


def test_the_readme_parser_keeps_commands_whole():
    text = "```bash\nmake demo   # c\npython -c \"a\nb\" \\\n  --x 1\n```\n"
    assert readme_commands(text) == ["make demo", "python -c 'a\nb' --x 1"]


def test_every_readme_command_runs_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in LINKED:
        (clone / name).symlink_to(ROOT / name)
    (clone / ".venv").symlink_to(Path(sys.prefix))  # the environment running the tests
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    env.pop("RANK", None)
    ran, failed = [], []
    for cmd in readme_commands((ROOT / "README.md").read_text()):
        if any(k in cmd for k in ELSEWHERE):
            continue
        extra = next((x for frag, x in SHORTER if frag in cmd), [])
        p = subprocess.run(["bash", "-c", cmd + "".join(" " + shlex.quote(x) for x in extra)],
                           cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        ran.append(cmd)
        if p.returncode != 0:
            failed.append(f"$ {cmd}\n(exit {p.returncode})\n{p.stderr[-2500:]}")
        else:
            assert "Traceback" not in p.stderr, f"$ {cmd}\n{p.stderr[-2500:]}"
            assert "Setting accelerator to CPU" not in p.stdout + p.stderr, cmd
    assert not failed, "\n\n".join(failed)
    assert len(ran) >= 10, ran
    # what the commands promise: a tokenizer with the tiny model and with each export
    from transformers import AutoTokenizer

    for d in ("runs/tiny-llama", "runs/finetune-pruned", "runs/hf-pruned"):
        assert AutoTokenizer.from_pretrained(clone / d, trust_remote_code=True)("x = 1")["input_ids"]
    assert (clone / "runs/demo-finetune/summary.json").exists()
    assert not (clone / "runs/finetune/checkpoints/diverged").exists()
