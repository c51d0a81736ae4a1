"""Turn a structured-sparse result into a physically smaller Hugging Face model.

    python -m ramda_ds.export RUN_OR_CHECKPOINT OUT [--layout per_layer|uniform] [--multiple_of N]
                              [--weights structured|W] [--base_model DIR]

``prune`` is the pure core (state dict + config + removable units → pruned state dict + sizes);
``api`` reads the sources (a run checkpoint of any world size, a RamdaTrainer ``checkpoint-N``,
or a live model + optimizer), checks the logits and writes the directory; ``txl`` does the same
for the project's Transformer-XL.
"""

from .api import ExportError, export_model, export_run, export_weights
from .prune import PruneError, plan, prune, zero_units

__all__ = ["ExportError", "PruneError", "export_model", "export_run", "export_weights", "plan",
           "prune", "zero_units"]
