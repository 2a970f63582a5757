"""A rank whose launcher died stops as if preempted.

torchrun starts every worker as the leader of a session of its own, so when the agent itself
is killed outright (SIGKILL: an OOM killer, a scheduler, a lost node agent) no signal
reaches the workers and they would train on to the end as orphans. The watch is a daemon
thread that looks at the parent's pid about once a second; when the parent this process
started under is gone (the process was reparented), it sends SIGTERM to its own process.
During training that is a preemption like any other (distnn.resilience.preemption): every
rank stops at the same step and rank 0 writes a checkpoint.

The ranks of one agent do not notice its death at exactly the same moment, and the first
rank's vote can stop the run before a slower rank has signalled itself. A SIGTERM arriving
then, after training, would meet SIGTERM's default action and end rank 0 in the middle of
its final checkpoint. So the polls fall on whole multiples of the interval of the wall clock
(all ranks of a machine look at the same moments), and the signal is sent at once only
while Python code catches SIGTERM (training is running); otherwise it is sent after
``GRACE_S`` seconds, unless the process is gone by then: a rank that is still starting up,
or that runs a loop of its own with no handler, ends by SIGTERM's default action.

Why a poll and not prctl(PR_SET_PDEATHSIG): the death signal follows the *thread* that
forked the child, not the process. torch's agent (2.13) forks its workers on its main
thread, where it would work, but that is the launcher's internal choice, the call needs
ctypes and Linux, and it misses a parent that died before the call. getppid() sees any
parent go.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from distnn._launched import STARTED

log = logging.getLogger("distnn")

POLL_S = 1.0  # seconds between looks at the parent: the delay before a rank notices
GRACE_S = 10.0  # seconds a rank that does not catch SIGTERM gets to end on its own
THREAD_NAME = "distnn-launcher-watch"


def sigterm_is_caught() -> bool:
    """True while a Python handler catches SIGTERM (distnn's training loop installs one)."""
    return callable(signal.getsignal(signal.SIGTERM))


def parent_at_start() -> int:
    """The parent this process had when it first imported distnn (distnn._launched), before
    torch's imports: a launcher killed during those seconds is seen gone too. A process
    forked after that import (its pid differs) has its parent of now."""
    pid, parent = STARTED
    return parent if pid == os.getpid() else os.getppid()


def launcher_gone() -> int | None:
    """The pid of the parent this process started under (:func:`parent_at_start`) when it
    is gone (the process was reparented); None while it lives."""
    parent = parent_at_start()
    return parent if os.getppid() != parent else None


@contextmanager
def launcher_watch(enabled: bool, *, interval_s: float = POLL_S,
                   grace_s: float = GRACE_S) -> Iterator[None]:
    """While inside, sends this process SIGTERM (once) when its parent process goes away.

    Nothing happens when ``enabled`` is False. The parent is the one this process had when
    it first imported distnn (:func:`parent_at_start`), so one gone already is seen at the
    first poll. The signal goes within ``interval_s`` seconds of the parent's death while
    SIGTERM is caught by a Python handler, else ``grace_s`` seconds after the watch noticed
    (or as soon as a handler is installed). The watch runs in a daemon thread (it never
    keeps the process alive) that wakes every ``interval_s`` seconds and touches nothing the
    training step uses; it is stopped and joined on the way out, after which it never
    signals.
    """
    if not enabled:
        yield
        return
    parent = parent_at_start()
    stopped = threading.Event()
    signalling = threading.Lock()  # a stop and a signal never cross

    def watch() -> None:
        while os.getppid() == parent:
            if stopped.wait(interval_s - time.time() % interval_s):
                return
        log.warning(f"the launcher (pid {parent}) is gone; stopping as if preempted (SIGTERM)")
        deadline = time.monotonic() + grace_s
        while not sigterm_is_caught() and time.monotonic() < deadline:
            if stopped.wait(0.05):
                return
        with signalling:
            if not stopped.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        yield
    finally:
        with signalling:
            stopped.set()
        thread.join()
