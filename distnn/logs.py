"""Messages for people, through the standard ``logging`` module (logger ``distnn``).

Rank 0 logs at INFO; the other ranks only log warnings and errors, each line prefixed with
the rank. ``--quiet`` keeps warnings and errors only; ``--verbose`` adds DEBUG on rank 0 and
INFO elsewhere. Loss lines and the summary are the program's output and go to stdout.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "distnn"


class _RankFormatter(logging.Formatter):
    """``distnn: [rank R: ]LEVEL: message``; rank 0's notes need no rank, everything else does."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.rank = rank
        self.prefix = f"rank {rank}: " if world_size > 1 else ""

    def format(self, record: logging.LogRecord) -> str:
        level = "note" if record.levelno == logging.INFO else record.levelname.lower()
        plain = self.rank == 0 and record.levelno < logging.WARNING
        return f"distnn: {'' if plain else self.prefix}{level}: {record.getMessage()}"


def configure_logging(*, rank: int, world_size: int, verbosity: int = 0) -> logging.Logger:
    """Sends the ``distnn`` logger to stderr, one write per line; returns it.

    ``verbosity``: -1 quiet, 0 normal, 1 verbose. Safe to call again: it replaces the
    handler it added before and leaves other handlers alone.
    """
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler.formatter, _RankFormatter):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)  # emits message + newline in one write
    handler.setFormatter(_RankFormatter(rank, world_size))
    logger.addHandler(handler)
    logger.propagate = False
    if verbosity < 0:
        level = logging.WARNING
    elif rank == 0:
        level = logging.DEBUG if verbosity > 0 else logging.INFO
    else:
        level = logging.INFO if verbosity > 0 else logging.WARNING
    logger.setLevel(level)
    return logger
