"""python -m distnn.tools.profile: the work of the steps alone, per step."""

from __future__ import annotations

from distnn.config import TrainConfig
from distnn.distributed.runtime import setup
from distnn.tools.profile import main, profile_steps


def test_the_profile_counts_the_steps_alone(no_launcher):
    # Start-up (building the model and data: hundreds of operators) and the warm-up run
    # stay out: what does not grow with the steps is a handful (the last flush of losses).
    with setup(device="cpu") as rt:
        short = profile_steps(TrainConfig(steps=10), rt)
        long = profile_steps(TrainConfig(steps=20), rt)
    once = round(2 * 10 * short.work_per_step - 20 * long.work_per_step)
    assert 0 <= once < 10, (short, long)
    per_step = {name: calls for name, calls, _ in long.top}
    # The forward's two layers, backward's three matmuls (the first layer's input needs no
    # gradient) and the update as one multi-tensor operation.
    assert per_step["aten::linear"] == 2 and per_step["aten::mm"] == 3
    assert per_step["aten::_foreach_add_"] == 1
    assert long.busy_us is None and long.wall_us > 0


def test_the_command_prints_a_table_and_refuses_bad_flags_in_one_line(capsys, no_launcher):
    assert main(["--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--steps 8 on CPU, 8 steps: ") and "| `aten::mm` | 3 |" in out, out
    assert "summary:" not in out
    assert main(["--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distnn.tools.profile: error: --steps"), err


def test_a_profile_with_no_work_recorded_is_one_line_and_exit_1(capsys, no_launcher,
                                                                 monkeypatch):
    """A profiler that records nothing in the steps' range (reported with CUDA 13.0 after an
    empty session) fails the command instead of reporting 0 kernels per step."""
    import distnn.tools.profile

    class Blind(distnn.tools.profile.profile):
        def events(self):
            return [e for e in super().events() if not e.name.startswith("aten::")]

    monkeypatch.setattr(distnn.tools.profile, "profile", Blind)
    assert main(["--steps", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distnn.tools.profile: error: the profiler recorded no operators in the steps' "
                   "range, so there is nothing to count"], err


def test_the_floor_on_the_cpu_or_with_flags_it_ignores_is_refused_in_one_line(capsys,
                                                                              no_launcher):
    assert main(["--floor", "--device", "cpu", "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distnn.tools.profile: error: --floor: the floor is a CUDA graph; this process "
                   "computes on the CPU"], err
    assert main(["--floor", "--epochs", "2", "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "distnn.tools.profile: error: --floor: got --epochs, --precision; the floor is the "
        "reference loop"), err
