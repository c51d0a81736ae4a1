"""Metrics sink of the training scripts: ``metrics.jsonl``, a tqdm progress bar, optional
TensorBoard scalars, a ``plot.png`` summary and a ``plot_units.png`` heat map of units kept.

Keys name the model they describe: ``*_structured`` is RAMDA's Ŵ (what export ships), ``*_W``
the weights W (see :mod:`ramda_ds.training.structured`).

Only the main process does anything; on every other process each method is a no-op.
"""

import json
import math
import os
import sys
from numbers import Real
from pathlib import Path

from tqdm import tqdm

#: shown in the bar's postfix (key: label); also the curves of plot.png
BAR_KEYS = {"loss": "loss", "valid_ppl_structured": "ppl(Ŵ)", "valid_ppl_W": "ppl(W)",
            "valid_ppl": "ppl", "wgs_structured": "wgs(Ŵ)", "wgs_W": "wgs(W)", "wgs": "wgs"}


class RunLogger:
    """Writes one JSON object per line to ``output_dir/metrics.jsonl``, mirrors numeric values to
    TensorBoard (``output_dir/tb``, when ``tensorboard`` is installed and enabled) and drives a tqdm
    bar on stderr, so stdout stays free for JSON and summary lines. ``start_step > 0`` means
    resuming: ``setup`` then appends instead of truncating, and TensorBoard hides the old events
    after ``start_step``."""

    def __init__(self, output_dir, total_steps: int, is_main: bool, start_step: int = 0,
                 tensorboard: bool = True, plot: bool = True, desc: str = "train"):
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.start_step, self.plot = start_step, plot
        self.active = is_main
        self._file = self._bar = self._tb = None
        self._postfix = {}
        if not is_main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", desc=desc,
                         mininterval=1, dynamic_ncols=True)
        if tensorboard:
            self._tb = _summary_writer(self.dir / "tb", start_step + 1 if start_step else None)

    def setup(self, row: dict) -> None:
        """Record the run's setup row; truncates an old metrics.jsonl unless resuming."""
        if self.active:
            self._write(row, mode="a" if self.start_step else "w")

    def resume(self, step: int) -> None:
        """Keep the rows without a "step" or with step <= ``step`` (and drop unreadable lines, such
        as one cut off by a crash); later ``log`` calls append after them."""
        if not self.active:
            return
        self._close_file()
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and row.get("step", step) <= step:
                    kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        """Append ``row`` (which has a "step"); numeric values also go to TensorBoard under their
        key, and those of ``BAR_KEYS`` to the bar's postfix (last value of each is kept)."""
        if not self.active:
            return
        self._write(row, mode="a")
        step = row["step"]
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, Real) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=step)
        shown = {label: row[k] for k, label in BAR_KEYS.items() if isinstance(row.get(k), Real)
                 and not isinstance(row[k], bool)}
        if shown:
            self._postfix.update(shown)
            self._bar.set_postfix(self._postfix, refresh=False)

    def advance(self, n: int = 1) -> None:
        """Move the bar by ``n`` optimizer steps."""
        if self.active:
            self._bar.update(n)

    def message(self, text: str) -> None:
        """Print a line to stdout without breaking the bar."""
        if self.active:
            tqdm.write(text)

    def close(self) -> None:
        """Close the file, bar and TensorBoard writer, then write plot.png if enabled. Idempotent;
        later calls of any method do nothing."""
        if not self.active:
            return
        self.active = False
        self._close_file()
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self.plot:
            write_plot(self.path, self.dir / "plot.png")
            write_units_plot(self.path, self.dir / "plot_units.png")

    def _write(self, row, mode):
        if mode == "w" or self._file is None:
            self._close_file()
            self._file = open(self.path, mode)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def _close_file(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def _summary_writer(logdir, purge_step):
    """A TensorBoard SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(logdir), purge_step=purge_step)


def _read_rows(metrics_path) -> list[dict]:
    rows = []
    if Path(metrics_path).exists():
        for line in Path(metrics_path).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _figure():
    try:
        from matplotlib.figure import Figure  # not pyplot: leaves the global backend alone
    except ImportError:
        print("matplotlib not installed: no plot.png", file=sys.stderr)
        return None
    return Figure


def _run_info(rows) -> tuple[str, list[int]]:
    """(title naming optimizer, λ, model and backend; restart steps) from the last setup row."""
    setup = next((r for r in reversed(rows) if "step" not in r), {})
    parts = [str(setup.get("optimizer", "")).upper()]
    if setup.get("lam") is not None:
        parts.append(f"λ = {setup['lam']:g}")
    if setup.get("model"):
        parts.append(Path(str(setup["model"])).name or str(setup["model"]))
    if setup.get("backend"):
        parts.append(f"{setup['backend']} × {setup.get('world_size', 1)}")
    frozen = [int(r["support_frozen_at"]) for r in rows if "support_frozen_at" in r]
    return "  ·  ".join(p for p in parts if p), [int(m) for m in setup.get("milestones", ())] + \
        [-m for m in frozen[-1:]]  # negative: the support freeze (its own line style)


def _mark_restarts(ax, milestones, label=True) -> None:
    """Dashed: the restarts; dotted red: the support freeze of a size target (a restart too)."""
    for i, m in enumerate(m for m in milestones if m > 0):
        ax.axvline(m, color="0.4", ls="--", lw=0.8, label="restart" if label and i == 0 else None)
    for m in (m for m in milestones if m < 0):
        ax.axvline(-m, color="tab:red", ls=":", lw=1.2, label="support frozen" if label else None)


PANELS = (("loss", "training loss", "loss (nats/token)", (("loss", "train"),)),
          ("ppl", "validation perplexity", "perplexity",
           (("valid_ppl_structured", "structured Ŵ (export)"), ("valid_ppl_W", "weights W"),
            ("valid_ppl", "model"))),
          ("wgs", "weighted group sparsity", "WGS (fraction of weights in zero groups)",
           (("wgs_structured", "structured Ŵ (export)"), ("wgs_W", "weights W"), ("wgs", "model"))))


def write_plot(metrics_path, png_path) -> None:
    """Loss, validation perplexity and weighted group sparsity against step (one panel each, both
    models Ŵ and W where present), dashed lines at the restarts, a title naming optimizer, λ and
    model. Skipped, with a line on stderr, when matplotlib is not installed; nothing is written
    when there is nothing to plot."""
    rows = _read_rows(metrics_path)
    panels = []
    for _, title, ylabel, curves in PANELS:
        found = []
        for key, label in curves:
            pts = [(r["step"], r[key]) for r in rows if "step" in r
                   and isinstance(r.get(key), Real) and not isinstance(r[key], bool)]
            if pts:
                found.append((label, pts))
        if found:
            panels.append((title, ylabel, found))
    if not panels:
        return
    Figure = _figure()
    if Figure is None:
        return
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    name, milestones = _run_info(rows)
    fig = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
    for ax, (title, ylabel, found) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        values = [v for _, pts in found for _, v in pts]
        for label, pts in found:
            steps, vals = zip(*pts)
            ax.plot(steps, vals, marker="." if len(pts) < 50 else None, label=label)
        _mark_restarts(ax, milestones)
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        if title.startswith("weighted"):
            ax.set_ylim(0, 1)
        elif min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")  # plain numbers on the ticks, not 10^x
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.grid(alpha=0.3)
        if len(found) > 1 or milestones:
            ax.legend(fontsize="small")
    if name:
        fig.suptitle(name)
    fig.savefig(png_path, dpi=100)


def write_units_plot(metrics_path, png_path) -> None:
    """Heat map of the fraction of units (groups) kept per regularized tensor (rows) at each
    evaluation (columns) — of Ŵ when the rows have it, else of W: shows units that come and go,
    which the WGS line hides. Nothing is written without per-tensor rows or matplotlib."""
    rows = _read_rows(metrics_path)
    for key, which in (("layer_sparsity_structured", "structured Ŵ"), ("layer_sparsity_W", "W"),
                       ("layer_sparsity", "model")):
        evals = [r for r in rows if "step" in r and isinstance(r.get(key), dict) and r[key]]
        if evals:
            break
    else:
        return
    Figure = _figure()
    if Figure is None:
        return
    names = sorted({n for r in evals for n in r[key]}, key=_natural)
    kept = [[1.0 - r[key].get(n, float("nan")) for r in evals] for n in names]
    steps = [r["step"] for r in evals]
    title, milestones = _run_info(rows)
    fig = Figure(figsize=(max(6, 0.25 * len(steps) + 3), max(3, 0.22 * len(names) + 1.5)),
                 layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(kept, aspect="auto", interpolation="nearest", vmin=0, vmax=1, cmap="viridis",
                   extent=(-0.5, len(steps) - 0.5, len(names) - 0.5, -0.5))
    ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names],
                  fontsize=7 if len(names) > 20 else 9)
    every = max(1, math.ceil(len(steps) / 8))
    ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]])
    for m in milestones:  # between the evaluations around the restart (< 0: the support freeze)
        pos = sum(s <= abs(m) for s in steps) - 0.5
        ax.axvline(pos, color="w" if m > 0 else "tab:red", ls="--" if m > 0 else ":", lw=1)
    ax.set(xlabel="optimizer step (evaluations; dashed: restart)", ylabel="tensor",
           title=f"units kept per tensor, {which}" + (f"\n{title}" if title else ""))
    fig.colorbar(im, ax=ax, label="fraction of units kept")
    fig.savefig(png_path, dpi=100)


def _natural(name: str):
    """Sort key: layers.10 after layers.9."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
