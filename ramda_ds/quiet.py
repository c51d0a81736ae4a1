"""Foreign warnings that do not apply, dropped once on import (the training scripts and export)."""

import logging


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_foreign_warnings() -> None:
    """Drop DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were
    unable to detect it." (printed to stdout by every import of deepspeed on a machine without a
    GPU, where CPU is what is meant). Installed on the "DeepSpeed" logger before deepspeed
    creates it; any other message of that logger passes. Idempotent."""
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in ds.filters):
        ds.addFilter(_DropMessages("Setting accelerator to CPU"))


quiet_foreign_warnings()
