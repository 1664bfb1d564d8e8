"""One logger for the pipeline, and the third-party notices it drops (everything else still shows)."""

from __future__ import annotations

import logging
import re

log = logging.getLogger("headline-bench")


# Third-party notices that ask nothing of the user, dropped in this one place (everything else still shows):
# logger name -> message pattern. torchao tries its CUDA / other-Python kernels on every import; torch warns
# that torchao registers an Enum with pytree. They are logging records (not `warnings`), so each gets a filter
# on its own logger, added when common is imported, before torch/torchao load.
QUIET_LOGS = {
    "torchao": r"Failed to load .*_C_|Skipping import of cpp extensions due to incompatible torch version",
    "torchao.kernel.intmm": r"Detected no triton",  # triton kernels are for GPUs; torch.compile says so itself if one lacks it
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported",
}


class _Drop(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    for name, pattern in QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(pattern))


quiet_third_party()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
