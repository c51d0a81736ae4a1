"""``python -m ramda_ds.export CHECKPOINT OUT``: see ramda_ds/export/__init__.py."""

import argparse
import sys

import ramda_ds.quiet  # noqa: F401  (quiet DeepSpeed import on CPU)

from .api import ExportError, export_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ramda_ds.export", description=(
        "Remove the zero FFN units and attention heads of a ramda_ds run and write a Hugging "
        "Face checkpoint that loads with AutoModelForCausalLM.from_pretrained."))
    ap.add_argument("checkpoint",
                    help="a run's output_dir, its checkpoints/ or one step_N directory; or a "
                    "RamdaTrainer checkpoint-N (or the Trainer's output_dir: its newest one)")
    ap.add_argument("out", help="new output directory (must not exist)")
    ap.add_argument("--layout", choices=("per_layer", "uniform"), default="per_layer",
                    help="per_layer: each layer keeps its own units (loads with "
                    "trust_remote_code=True); uniform: one width for all layers (stock config)")
    ap.add_argument("--multiple_of", type=int, default=1,
                    help="uniform: round the FFN width up to a multiple of this")
    ap.add_argument("--weights", choices=("structured", "W"), default="structured",
                    help="structured: RAMDA's Ŵ (exactly sparse at every step); W: the weights")
    ap.add_argument("--base_model", default=None,
                    help="the HF directory the run started from (default: recorded by the run)")
    ap.add_argument("--allow_diverged", action="store_true",
                    help="export a run that the training loop stopped as diverged (recorded in "
                    "pruning.json)")
    a = ap.parse_args(argv)
    try:
        export_run(a.checkpoint, a.out, layout=a.layout, multiple_of=a.multiple_of,
                   weights=a.weights, base_model=a.base_model, allow_diverged=a.allow_diverged)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
