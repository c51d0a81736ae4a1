r"""The interface a kernel set implements: the passes the host drivers call on one step's table.

A backend (``"native"``: C loops, :mod:`.native`; ``"triton"``: :mod:`.triton_pg` with the exact
kernels of :mod:`.exact`) is one :class:`KernelSet` subclass bound to a :class:`.table.Table` (the
rows of a step plan, :mod:`.plan`).  The drivers — :func:`.sharded.solve_pg` (PG on any table: chunks
of iterations for problems whose groups are whole on this rank, one iteration a pass for those
whose groups span ranks) and :func:`.sharded.solve_exact` (the exact solver's Newton passes) —
own every decision (screening,
step sizes, stop rules, Newton updates, collectives) and call only these methods; every method
works on all rows of the table at once.

Per-group vectors (``f``, ``eta``, ``mu``, ``act``, the returned sums) are indexed by the table's
group slots (``geom[t][3]`` is row t's first slot, −1 for a free row); pointer columns
``COL_W``, ``COL_Y``, ``COL_Y2`` of :mod:`.table` name the buffers a pass reads and writes.
Sums are float64; elementwise results follow the torch path's operations (see each backend).
"""

from __future__ import annotations

import torch


class KernelSet:
    """The passes of one backend over one table (``self.tab``)."""

    #: per-row thresholds τ (float64, on the table's device)
    tau_t: torch.Tensor

    def free(self) -> None:
        """Unregularized rows: the stage, ``Ŵ = W0 − V/P`` (ProxGen: AdamW's step) and the
        averaging ``W ← lerp(W, Ŵ, c)``, in one pass."""
        raise NotImplementedError

    def stage(self):
        """Regularized rows, PG: the elementwise stage (``V, U, P, b`` stored) and per group
        slot ``(Σb², Σ(½P∘W0 − V)∘W0, max P)``."""
        raise NotImplementedError

    def spare(self, t: int) -> None:
        """Allocate row t's second iterate buffer ``Y'`` (first needed at the second pass)."""
        raise NotImplementedError

    def chunk(self, n: list, f: torch.Tensor, eta: torch.Tensor, src: int, dst: int) -> list:
        """``n[t]`` PG iterations of row t from column ``src`` into ``dst`` (whole groups per
        block): ``f`` (per slot) is updated in place to the last iteration's soft-threshold
        factors; returns per row and iteration its share of Q (``[T][max n]``)."""
        raise NotImplementedError

    def iterate(self, live, f, eta, src: int, dst: int) -> torch.Tensor:
        """One PG iteration of the rows with ``live[t]``: ``Y_dst = ηb + (1 − ηP)∘(f∘Y_src)`` and
        per slot ``[ΣY², ΣPY², ΣbY]`` (``[3, G]``)."""
        raise NotImplementedError

    def finish(self, f: torch.Tensor, ycol: list) -> None:
        """``Ŵ = f∘Y`` (row t's ``Y`` in column ``ycol[t]``), the averaging, Ŵ stored if asked."""
        raise NotImplementedError

    def exact_stage(self):
        """Regularized rows, exact solver: the stage and per slot ``(Σb², max P, min P)``."""
        raise NotImplementedError

    def exact_iter(self, live, mu: torch.Tensor) -> torch.Tensor:
        """One Newton pass at ``mu`` (per slot): ``[Σb²/(P+μ)², Σb²/(P+μ)³]`` (``[2, G]``)."""
        raise NotImplementedError

    def exact_finish(self, mu: torch.Tensor, act: torch.Tensor) -> None:
        """``Ŵ = b/(P + μ)`` on active groups (0 elsewhere), the averaging, Ŵ stored if asked."""
        raise NotImplementedError
