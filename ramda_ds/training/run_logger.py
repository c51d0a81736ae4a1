"""Metrics sink of the training scripts: ``metrics.jsonl``, a tqdm progress bar, optional
TensorBoard scalars and a ``plot.png`` summary.

Only the main process does anything; on every other process each method is a no-op.
"""

import json
import os
import sys
from numbers import Real
from pathlib import Path

from tqdm import tqdm

BAR_KEYS = ("loss", "valid_ppl", "wgs")  # shown in the bar's postfix, and the panels of plot.png


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
        key, and loss / valid_ppl / wgs to the bar's postfix (last value of each is kept)."""
        if not self.active:
            return
        self._write(row, mode="a")
        step = row["step"]
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, Real) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=step)
        shown = {k: row[k] for k in BAR_KEYS if isinstance(row.get(k), Real)}
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


def write_plot(metrics_path, png_path) -> None:
    """Plot loss, validation perplexity (log y) and weighted group sparsity against step, one panel
    for each of them found in the rows of ``metrics_path``. Skipped, with a line on stderr, when
    matplotlib is not installed; nothing is written when there is nothing to plot."""
    try:
        from matplotlib.figure import Figure  # not pyplot: leaves the global backend alone
    except ImportError:
        print("matplotlib not installed: no plot.png", file=sys.stderr)
        return
    rows = []
    if Path(metrics_path).exists():
        for line in Path(metrics_path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    series = {}
    for key in BAR_KEYS:
        points = [(r["step"], r[key]) for r in rows if isinstance(r, dict) and "step" in r
                  and isinstance(r.get(key), Real)]
        if points:
            series[key] = points
    if not series:
        return
    titles = dict(loss="training loss", valid_ppl="validation perplexity",
                  wgs="weighted group sparsity")
    fig = Figure(figsize=(5 * len(series), 3.6), layout="tight")
    for ax, (key, points) in zip(fig.subplots(1, len(series), squeeze=False)[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set(title=titles[key], xlabel="step")
        if key == "wgs":
            ax.set_ylim(0, 1)
        elif min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.savefig(png_path, dpi=100)
