"""distnn.settings: the DISTNN_* variables read once, each checked, the rest ignored."""

import pytest
import torch

from distnn.errors import UsageError
from distnn.resilience.faults import FaultPlan
from distnn.settings import Settings
from distnn.step import wgrad


def test_an_empty_environment_is_the_defaults():
    assert Settings.from_environ({"PATH": "/bin", "DISTNN_OTHER": "x"}) == Settings()
    assert Settings() == Settings(weight_grad=None, bf16_fusions=True, fault=None)


@pytest.mark.parametrize(("value", "want"), [(None, True), ("", True), ("1", True),
                                             ("0", False)])
def test_distnn_bf16_fusions_turns_them_off_with_0(value, want):
    environ = {} if value is None else {"DISTNN_BF16_FUSIONS": value}
    assert Settings.from_environ(environ).bf16_fusions is want


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("DISTNN_BF16_FUSIONS", "yes", r"allowed: 1 .*, 0 "),
    ("DISTNN_WEIGHT_GRAD", "g @ x", r"allowed: 'g.T @ x', "),
    ("DISTNN_FAULT_STEP", "-1", r"allowed: an integer >= 0"),
    ("DISTNN_FAULT_KIND", "melt", r"allowed: exit, hang, "),
])
def test_a_bad_value_is_refused_naming_the_variable_and_what_is_allowed(name, value, allowed):
    environ = {"DISTNN_FAULT_STEP": "3", name: value}
    with pytest.raises(UsageError, match=rf"environment: {name}={value!r}; {allowed}"):
        Settings.from_environ(environ)


def test_a_weight_gradient_layout_is_kept_by_name_and_resolved_for_the_run():
    settings = Settings.from_environ({"DISTNN_WEIGHT_GRAD": wgrad.BOTH_COPIED})
    assert settings.weight_grad == wgrad.BOTH_COPIED
    with pytest.raises(UsageError, match="with --precision bf16"):
        wgrad.resolve(settings.weight_grad, precision="bf16", compiled=False,
                      device=torch.device("cpu"))


def test_a_fault_fires_on_the_first_attempt_only_and_a_stall_needs_cuda():
    settings = Settings.from_environ({"DISTNN_FAULT_STEP": "4", "DISTNN_FAULT_RANK": "1",
                                      "DISTNN_FAULT_KIND": "diverge"})
    assert settings.fault == FaultPlan(step=4, rank=1, kind="diverge")
    cpu = torch.device("cpu")
    assert settings.fault.for_attempt(restart_count=0, device=cpu,
                                      world_size=2) == settings.fault
    assert settings.fault.for_attempt(restart_count=1, device=cpu, world_size=2) is None
    stall = Settings.from_environ({"DISTNN_FAULT_STEP": "4", "DISTNN_FAULT_KIND": "stall"})
    with pytest.raises(UsageError, match="stall needs a CUDA device"):
        stall.fault.for_attempt(restart_count=0, device=cpu, world_size=1)


def test_a_drill_that_could_never_fire_is_refused():
    # a rank the job does not have, or a step the run never takes, was a drill doing nothing
    plan = FaultPlan(step=4, rank=2)
    cpu = torch.device("cpu")
    with pytest.raises(UsageError, match=r"DISTNN_FAULT_RANK=2, but the job has 2 rank\(s\); "
                                         r"allowed: 0 to 1$"):
        plan.for_attempt(restart_count=0, device=cpu, world_size=2)
    assert plan.for_attempt(restart_count=0, device=cpu, world_size=3) == plan
    assert plan.for_attempt(restart_count=1, device=cpu, world_size=2) is None  # restarted
    plan.check_step(5)
    with pytest.raises(UsageError, match=r"DISTNN_FAULT_STEP=4, but the run has 4 step\(s\); "
                                         r"allowed: 0 to 3$"):
        plan.check_step(4)
