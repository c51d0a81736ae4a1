"""Compression recipes on top of the optimizers: name a size, identify the structure with RAMDA,
then recover the kept units with no shrinkage, optionally distilling from the dense model.

* :func:`ramda_ds.metrics.group_totals`: per-group totals of any per-element quantity over the
  optimizer's (possibly sharded) tensors, one all-reduce.
* :mod:`.target`: the size target: a schedule of kept fractions and the λ that meets it.
* :mod:`.support`: freezing a support (removed units held at exactly zero).
* :mod:`.recipe`: :class:`~.recipe.TargetRecipe`, identify → freeze → recover, driven per step.
* :mod:`.importance`: the prune-then-recover baselines' unit scores (weight norm, activation).
* :mod:`.distill`: the logit-distillation loss.

See docs/compression.md.
"""
