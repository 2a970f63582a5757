"""DISTNN_WEIGHT_GRAD: the Linear layers' weight gradients in another layout of the same
product give autograd's gradients, eager and compiled whole, and a run that uses one trains
as the reference does; F.linear's keyword calls are taken, autocast's left alone; a bad
setting is one line and exit 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distnn.settings import Settings
from distnn.step import wgrad
from distnn.train import main
from tests.conftest import read_losses
from tests.reference import assert_matches_reference


def _gradients(model, x, y, layout=None):
    model.zero_grad()
    if layout is None:
        loss = torch.nn.functional.mse_loss(model(x), y, reduction="sum")
    else:
        with wgrad.Layout(layout):
            loss = torch.nn.functional.mse_loss(model(x), y, reduction="sum")
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("layout", list(wgrad.LAYOUTS))
def test_each_layout_gives_autogradss_gradients(layout):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 40, generator=generator), torch.randn(48, 6, generator=generator)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(),
                                torch.nn.Linear(24, 6, bias=False))
    want = _gradients(model, x, y)
    got = _gradients(model, x, y, layout)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_keyword_calls_are_taken_and_autocast_or_other_shapes_left_alone():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(16, 8, generator=generator)
    w = torch.randn(4, 8, generator=generator, requires_grad=True)
    b = torch.randn(4, generator=generator, requires_grad=True)
    zero = wgrad._linear(lambda g, x: torch.zeros(g.shape[1], x.shape[1]))
    calls = {"positional": lambda: F.linear(x, w, b), "keywords": lambda: F.linear(
        input=x, weight=w, bias=b), "mixed": lambda: F.linear(x, weight=w)}
    for name, call in calls.items():
        w.grad = None
        with wgrad.Layout("(x.T @ g).T") as mode:
            mode.linear = zero  # a layout that shows whether it ran
            call().sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w)), name
    for name, call in {"autocast": lambda: F.linear(x, w, b),
                       "3-dim": lambda: F.linear(x.view(2, 8, 8), w, b)}.items():
        w.grad = None
        with wgrad.Layout("(x.T @ g).T") as mode:
            mode.linear = zero
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "autocast"):
                call().float().sum().backward()
        assert w.grad.abs().sum() > 0, name


CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize(("precision", "compiled", "device", "expected"), [
    ("tf32", True, CUDA, wgrad.BOTH_COPIED),  # measured faster there (docs/benchmarks.md)
    ("tf32", False, CUDA, wgrad.AUTOGRAD),
    ("fp32", True, CUDA, wgrad.AUTOGRAD),
    ("bf16", True, CUDA, wgrad.AUTOGRAD),
    ("fp32", True, CPU, wgrad.AUTOGRAD),
])
def test_the_default_layout_is_the_forwards_only_for_the_compiled_tf32_step_on_a_gpu(
        precision, compiled, device, expected):
    for environ in ({}, {"DISTNN_WEIGHT_GRAD": ""}):  # an empty setting is the default
        name = Settings.from_environ(environ).weight_grad
        assert wgrad.resolve(name, precision=precision, compiled=compiled,
                             device=device) == expected


def test_a_layout_named_replaces_the_default():
    name = Settings.from_environ({"DISTNN_WEIGHT_GRAD": wgrad.AUTOGRAD}).weight_grad
    assert wgrad.resolve(name, precision="tf32", compiled=True, device=CUDA) == wgrad.AUTOGRAD


@pytest.mark.parametrize("flags", [[], ["--compile"]])
def test_a_run_with_a_layout_uses_it_and_matches_the_reference(tmp_path, no_launcher,
                                                                 monkeypatch, caplog, flags):
    """The eager step and the compiled whole step compute the weight gradients with the
    layout named: one that gives zeros leaves the weight matrices as they started (the
    biases train); the real one trains as the reference does."""
    from distnn.config import TrainConfig
    from distnn.data.shards import reference_setup

    name = "(x.T @ g).T"
    monkeypatch.setenv("DISTNN_WEIGHT_GRAD", name)
    zeros = wgrad._linear(lambda g, x: torch.zeros(g.shape[1], x.shape[1]))
    runs = {}
    for kind, linear in (("zero", zeros), ("real", wgrad._LINEARS[name])):
        monkeypatch.setitem(wgrad._LINEARS, name, linear)
        metrics, weights = tmp_path / f"{kind}.jsonl", tmp_path / f"{kind}.safetensors"
        assert main([*flags, "--steps", "100", "--metrics", str(metrics), "--save",
                     str(weights)]) == 0
        runs[kind] = read_losses(metrics), load_file(weights)
    _, _, initial = reference_setup(TrainConfig().resolved())
    start = initial.state_dict()
    zero = runs["zero"][1]
    assert torch.equal(zero["0.weight"], start["0.weight"])
    assert torch.equal(zero["2.weight"], start["2.weight"])
    assert not torch.equal(zero["0.bias"], start["0.bias"])
    assert_matches_reference(*runs["real"], steps=100)
    assert not [r for r in caplog.records if "could not be compiled" in r.message]


@pytest.mark.parametrize(("value", "flags", "said"), [
    ("g @ x", [], "DISTNN_WEIGHT_GRAD='g @ x'; allowed: 'g.T @ x', '(x.T @ g).T'"),
    ("(x.T @ g).T", ["--precision", "bf16"],
     "DISTNN_WEIGHT_GRAD='(x.T @ g).T' with --precision bf16; it applies to fp32 and tf32"),
])
def test_a_bad_setting_is_one_line_and_exit_2(no_launcher, monkeypatch, capsys, value, flags,
                                              said):
    monkeypatch.setenv("DISTNN_WEIGHT_GRAD", value)
    assert main([*flags, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"distnn: error: environment: {said}"), err
