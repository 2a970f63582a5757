"""Entry point: ``python -m distnn.train``, ``distnn-train``, or under torchrun/accelerate.

A thin layer: the flags become a TrainConfig, the launcher's environment a Runtime, and the
Trainer (distnn/trainer.py) runs the Job the flags describe (distnn/job/spec.py). Every error a
user can act on ends here as one line and an exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from distnn.config import TrainConfig, parse_config
from distnn.distributed.environment import detect_launch
from distnn.distributed.process_group import (
    CollectiveFailed,
    DeviceStalled,
    peer_failure,
    tell_peers,
)
from distnn.distributed.runtime import setup
from distnn.errors import EXIT_USAGE, RunFailed, UsageError
from distnn.logs import configure_logging
from distnn.settings import Settings
from distnn.trainer import Trainer

__all__ = ["main"]

log = logging.getLogger("distnn")
PEER_GRACE_S = 2.0  # how long a rank that failed alone waits before exiting (see main)

_REPORTED = (UsageError, RunFailed, CollectiveFailed)


def _report(error: Exception, config: TrainConfig | None,
            cause: dict[str, Any] | None = None) -> int:
    """Logs ``error`` as one line (naming the rank in a multi-rank job); returns the exit code.

    2 for usage and communication errors, RunFailed's own code otherwise. A failed
    collective whose ``cause`` a peer left in the job's store (process_group.tell_peers) is
    reported as that peer's line, still with 2: the peer's own exit code is its alone.
    """
    message, code = _one_line(error), _exit_code(error)
    if isinstance(error, CollectiveFailed):
        if cause is not None:
            message = f"rank {cause['rank']} stopped the run: {cause['message']}"
        else:
            timeout = f" (--timeout-s {config.timeout_s:g})" if config else ""
            message = (f"{message} (a peer died, is unreachable, or did not answer within "
                       f"the timeout{timeout})")
    if isinstance(error, RunFailed) and error.label == "stopped":
        log.warning(f"stopped: {message}")
    else:
        log.error(message)
    return code


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # one line, whatever the error text held


def _exit_code(error: Exception) -> int:
    """RunFailed's own code; 2 (EXIT_USAGE) for usage errors, and for a failed collective
    (a lost peer), as docs/checkpoints-and-faults.md lists."""
    return error.exit_code if isinstance(error, RunFailed) else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit code.

    0: done. 2: bad input, bad launch environment, or a peer lost. 3: non-finite values or
    diverged replicas. 4: a checkpoint or --save could not be written. 5: out of memory.
    128+N: stopped by signal N (preempted), after a checkpoint.
    """
    launch, config = None, None
    configure_logging(rank=0, world_size=1)
    try:
        launch = detect_launch(os.environ)
        configure_logging(rank=launch.rank, world_size=launch.world_size)
        config = parse_config(argv)
        configure_logging(rank=launch.rank, world_size=launch.world_size,
                          verbosity=config.verbosity)
        with setup(device=config.device, backend=config.backend, timeout_s=config.timeout_s,
                   launch=launch, sharding=config.shard != "none") as runtime:
            try:
                Trainer(config, runtime, settings=Settings.from_environ(os.environ)).train()
            except _REPORTED as error:
                # a stop is agreed (every rank stops at the same step and says so itself),
                # and the launcher whose store tell_peers writes to may be the one gone
                stopped = isinstance(error, RunFailed) and error.label == "stopped"
                if stopped:
                    # The checkpoint is written. A late copy of the signal (torchrun forwards
                    # its own) must not turn the exit code 143 into a kill.
                    for signum in (signal.SIGTERM, signal.SIGHUP):
                        signal.signal(signum, signal.SIG_IGN)
                failed_here = (runtime.communicates and not stopped
                               and not isinstance(error, CollectiveFailed))
                if failed_here:
                    tell_peers(_one_line(error), _exit_code(error), launch=launch)
                # Said before the group is torn down: once a peer exits, the launcher may
                # stop this rank at any moment.
                cause = (peer_failure(launch) if isinstance(error, CollectiveFailed)
                         and not isinstance(error, DeviceStalled) else None)
                code = _report(error, config, cause)
                if cause is not None or (failed_here and getattr(error, "alone", False)):
                    # As soon as one rank exits, torchrun stops the others. A peer's failure:
                    # let the rank that failed go first, as torchrun's report names the first
                    # to exit. This rank's own, out of step with the others: they often fail
                    # alike (memory runs out where they all allocate the same), a little
                    # later under load; wait for them to say their own line.
                    time.sleep(PEER_GRACE_S)
                if isinstance(error, DeviceStalled):
                    # The GPU is stuck behind a collective that will not finish, and tearing
                    # down the group or CUDA could wait on it for good. Files are closed.
                    logging.shutdown()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
                return code
            except Exception as error:  # a bug, or the user's model: the traceback follows
                cause = peer_failure(launch) if runtime.communicates else None
                if cause is not None:
                    # a peer's failure reached this rank as an error of torch's own code (a
                    # collective inside it, say): the peer's line is the one to say
                    code = _report(CollectiveFailed(_one_line(error)), config, cause)
                    time.sleep(PEER_GRACE_S)
                    return code
                if runtime.communicates:
                    tell_peers(f"{type(error).__name__}: {_one_line(error)} (its own output "
                               "has the traceback)", 1, launch=launch)
                raise
    except _REPORTED as error:
        code = _report(error, config)
        if launch and launch.world_size > 1:
            # Failed before the ranks could share errors: each rank checks alone. As soon as
            # one exits, torchrun stops the others, so linger long enough for the slower
            # ranks (still importing torch, say) to say their own line first.
            time.sleep(PEER_GRACE_S)
        return code
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one
        log.error("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
