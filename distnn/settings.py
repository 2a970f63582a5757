"""The settings a run takes from the environment (``DISTNN_*``), read once into one object.

They are for the project's own benchmarks and drills, not for everyday runs (the flags are):

- ``DISTNN_WEIGHT_GRAD``: the Linear layers' weight-gradient layout (distnn.step.wgrad);
- ``DISTNN_BF16_FUSIONS``: ``0`` runs the compiled bf16 step as written (distnn.step.fusions);
- ``DISTNN_FAULT_STEP``, ``DISTNN_FAULT_RANK``, ``DISTNN_FAULT_KIND``: a fault to inject
  (distnn.resilience.faults).

A bad value is a UsageError naming the variable, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from distnn.errors import UsageError
from distnn.resilience.faults import FaultPlan
from distnn.step.wgrad import LAYOUTS


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The environment's part of a run. The defaults are those of an empty environment."""

    weight_grad: str | None = None
    """The weight-gradient layout (a name in wgrad.LAYOUTS), or None: the run's default."""
    bf16_fusions: bool = True
    """Whether the compiled bf16 step uses distnn.step.fusions."""
    fault: FaultPlan | None = None
    """The fault to inject, on the first attempt of a job only."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Reads and checks the variables (pass ``os.environ``); the rest of the environment
        is ignored."""
        weight_grad = environ.get("DISTNN_WEIGHT_GRAD") or None
        if weight_grad is not None and weight_grad not in LAYOUTS:
            raise UsageError(f"environment: DISTNN_WEIGHT_GRAD={weight_grad!r}; allowed: "
                             + ", ".join(repr(known) for known in LAYOUTS))
        fusions = environ.get("DISTNN_BF16_FUSIONS") or "1"
        if fusions not in ("0", "1"):
            raise UsageError(f"environment: DISTNN_BF16_FUSIONS={fusions!r}; allowed: 1 (the "
                             "default: fused), 0 (the bf16 whole step as written)")
        return cls(weight_grad=weight_grad, bf16_fusions=fusions == "1",
                   fault=FaultPlan.from_environ(environ))
