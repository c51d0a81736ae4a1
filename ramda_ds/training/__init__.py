"""Training-run machinery shared by the launch scripts: checkpoints, metrics sink, the loop."""

from ..quiet import quiet_foreign_warnings  # noqa: F401 (installed on import)
