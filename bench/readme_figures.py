"""Regenerate the numbers the README and docs/fine-tuning.md quote, from the code as it is:

    python bench/readme_figures.py            # make demo + make demo-finetune's runs (~2 min on 2 cores)
    python bench/readme_figures.py --sweep    # also the λ sweep of docs/fine-tuning.md (5 more runs)
    python bench/readme_figures.py --sweep_only  # only the sweep

Runs the commands of ``make demo`` and ``make demo-finetune`` (their defaults) into a scratch
directory and rewrites the blocks between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``
in README.md and docs/fine-tuning.md with the results, the date, the commit and the machine.
Timings depend on the machine's load (printed with them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LAMS = ("1e-5", "1e-4", "3e-4", "1e-3", "3e-3")


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t, p.stdout


def last_row(out: Path) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r][-1]


def training_seconds(stdout: str) -> float:
    m = re.search(r"\((\d+) s of training for \d+ steps\)", stdout)
    return float(m.group(1)) if m else float("nan")


def provenance() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    busy = ("; the machine was shared (load above its cores): the times measure the load more "
            "than the code" if load > (os.cpu_count() or 1) else "")
    return (f"{datetime.date.today().isoformat()}, commit {commit}{' (modified)' if dirty else ''}, "
            f"{os.cpu_count()} CPU cores ({platform.machine()}, load {load:.1f}), Python "
            f"{platform.python_version()}, torch {torch.__version__}; `python bench/readme_figures.py`"
            f"{busy}")


def replace_block(path: Path, name: str, text: str) -> None:
    s = path.read_text()
    pat = re.compile(rf"(<!-- figures:{name} -->\n).*?(<!-- /figures:{name} -->)", re.S)
    if not pat.search(s):
        raise SystemExit(f"{path} has no <!-- figures:{name} --> block")
    path.write_text(pat.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also the λ sweep (5 fine-tuning runs)")
    ap.add_argument("--sweep_only", action="store_true", help="only the λ sweep")
    ap.add_argument("--dry_run", action="store_true", help="print, do not rewrite the files")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        run([PY, "-m", "ramda_ds.training.tiny_model", "tiny-llama"], d)
        if not a.sweep_only:
            wall, out = run([PY, str(ROOT / "launch/train_lm.py"), "--output_dir", "demo"], d)
            demo, demo_s = last_row(d / "demo"), training_seconds(out)
            fwall, fout = run([PY, str(ROOT / "launch/finetune_llm.py"), "--model_path",
                               "tiny-llama", "--output_dir", "ft"], d)
            ft, ft_s = json.loads((d / "ft" / "summary.json").read_text()), training_seconds(fout)
        sweep = []
        if a.sweep or a.sweep_only:
            for lam in LAMS:
                run([PY, str(ROOT / "launch/finetune_llm.py"), "--model_path", "tiny-llama",
                     "--output_dir", f"lam{lam}", "--lam", lam], d)
                sweep.append((lam, json.loads((d / f"lam{lam}" / "summary.json").read_text())))
    where = provenance()
    blocks = {}
    if not a.sweep_only:
        blocks = demo_blocks(demo, demo_s, wall, ft, ft_s, fwall, where)
    if sweep:
        blocks["sweep"] = sweep_table(sweep, where)
    for name, text in blocks.items():
        print(f"--- {name}\n{text}")
        if a.dry_run:
            continue
        for f in (ROOT / "README.md", ROOT / "docs" / "fine-tuning.md"):
            if f"<!-- figures:{name} -->" in f.read_text():
                replace_block(f, name, text)


def demo_blocks(demo, demo_s, wall, ft, ft_s, fwall, where) -> dict:
    same = "W = Ŵ exactly" if demo.get("W_is_structured") else \
        f"W: perplexity {demo['valid_ppl_W']:.2f}, WGS {demo['wgs_W']:.3f}"
    return {
        "demo": (f"`make demo` (600 steps, batch 8 × 32 tokens, RAMDA lr 2e-2, λ = 1e-5, restart at "
                 f"step 400): the structured model Ŵ reaches validation perplexity "
                 f"**{demo['valid_ppl_structured']:.2f}** at weighted group sparsity "
                 f"**{demo['wgs_structured']:.3f}** ({same}), in {demo_s:.0f} s of training "
                 f"({wall:.0f} s wall).\n_Measured {where}._"),
        "finetune": (f"`make demo-finetune` (tiny Llama with its BPE tokenizer, 200 steps, λ = 1e-4, "
                     f"restart at step 100): Ŵ reaches validation perplexity **{ft['ppl']:.2f}** at "
                     f"weighted group sparsity **{ft['wgs']:.3f}** ("
                     + ("W = Ŵ exactly" if ft.get("W_is_structured") else "W ≠ Ŵ") +
                     f"; units kept: " + ", ".join(f"{n.split('.')[2]}.{n.split('.')[-2]} "
                                                  f"{t - z}/{t}" for n, (z, t) in ft["units"].items())
                     + f"), in {ft_s:.0f} s of training ({fwall:.0f} s wall).\n_Measured {where}._"),
    }


def sweep_table(sweep, where) -> str:
    lines = ["| λ | FFN neurons kept | heads kept | WGS | valid ppl (Ŵ) |", "|---|---|---|---|---|"]
    for lam, s in sweep:
        ffn = [(t - z, t) for n, (z, t) in s["units"].items() if "mlp" in n]
        heads = [(t - z, t) for n, (z, t) in s["units"].items() if "attn" in n]
        k = lambda xs: f"{sum(x for x, _ in xs)} / {sum(t for _, t in xs)}"  # noqa: E731
        lines.append(f"| {lam}{' (default)' if lam == '1e-4' else ''} | {k(ffn)} | {k(heads)} | "
                     f"{s['wgs']:.3f} | {s['ppl']:.1f} |")
    return "\n".join(lines) + f"\n\n_Measured (with `--sweep_only`) {where}._"


if __name__ == "__main__":
    main()
