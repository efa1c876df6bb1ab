"""The messages a logger hears inside a `with` block, for tests that read what diffusers or
ComfyUI log (their loggers do not all propagate to the root, so the handler goes on the one named)."""
from __future__ import annotations

import logging
from contextlib import contextmanager


class _Records(logging.Handler):
    def __init__(self, level: int):
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def logged(name: str | None = None, level: int = logging.DEBUG):
    """Yield the list that receives every message `name` (None: the root logger) logs at
    `level` or above until the block ends."""
    records, logger = _Records(level), logging.getLogger(name)
    logger.addHandler(records)
    try:
        yield records.messages
    finally:
        logger.removeHandler(records)
