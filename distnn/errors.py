"""What a user sees when a run cannot go on: the error types and their exit codes.

Every failure a user can meet ends as one line on stderr, on every rank, and one of these
exit codes (docs/checkpoints-and-faults.md lists them with examples):

====  =====================================================================================
   2  EXIT_USAGE: a bad flag, argument, data file, environment or launch (UsageError);
      a lost peer (a failed collective)
   3  EXIT_GUARD: non-finite loss, gradient or weights, or replicas that diverged
   4  EXIT_OUTPUT: a checkpoint or --save that could not be written (--metrics and
      --tensorboard only warn: the weights are the run's result)
   5  EXIT_MEMORY: something that does not fit in memory
128+N stopped by signal N (SIGTERM, SIGHUP, SIGINT: preemption), after a checkpoint
====  =====================================================================================
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_GUARD = 3
EXIT_OUTPUT = 4
EXIT_MEMORY = 5
EXIT_SIGNAL_BASE = 128


class UsageError(ValueError):
    """A mistake the user can fix: a bad flag value, a bad launch environment, an unusable path
    (exit code ``EXIT_USAGE``)."""


class RunFailed(Exception):
    """The run cannot go on; ``exit_code`` is one of this module's codes.

    ``label`` heads the one-line report: "error", or "stopped" for a requested stop.
    ``alone``: raised on this rank by itself, not agreed with the others (out of memory).
    """

    def __init__(self, message: str, exit_code: int, label: str = "error", *,
                 alone: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.label = label
        self.alone = alone
