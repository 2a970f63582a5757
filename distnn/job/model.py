"""The network: the reference program's MLP (deeper with more hidden layers), or the user's
own, built by ``--model MODULE:FUNCTION``."""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from distnn.config import TrainConfig
from distnn.errors import UsageError


def build_model(d_in: int, hidden: Sequence[int], d_out: int) -> nn.Sequential:
    """``Linear(d_in, h1) -> ReLU -> ... -> Linear(hk, d_out)``, on the CPU, default init.

    With one hidden layer (the reference program's) its state_dict keys are ``0.weight``,
    ``0.bias``, ``2.weight``, ``2.bias``; each further hidden layer adds a Linear and a ReLU.
    """
    widths = [d_in, *hidden]
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], d_out))


def import_model(spec: str, *, d_in: int, d_out: int,
                 kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``FUNCTION(d_in=..., d_out=..., **kwargs)`` of ``spec`` = "MODULE:FUNCTION" (--model,
    with --model-args' ``kwargs``).

    Raises UsageError, naming what failed, when the module does not import, the function is
    missing, does not take the arguments, raises, or returns something other than an
    ``nn.Module``.
    """
    kwargs = kwargs or {}
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any failure while importing the user's code
        raise UsageError(f"--model: cannot import {module_name!r} ({type(error).__name__}: "
                         f"{_first_line(error)}); allowed: an importable module (the working "
                         "directory and PYTHONPATH are searched)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"--model: {module_name!r} has no function {function_name!r}; "
                         "allowed: MODULE:FUNCTION naming a function of the module")
    try:
        inspect.signature(function).bind(d_in=d_in, d_out=d_out, **kwargs)
    except TypeError as error:
        raise UsageError(f"--model-args: {spec} does not take (d_in, d_out"
                         f"{''.join(', ' + name for name in kwargs)}): {error}; allowed: "
                         "the keyword arguments its signature names") from None
    except ValueError:  # no signature to read (a builtin): the call says
        pass
    try:
        model = function(d_in=d_in, d_out=d_out, **kwargs)
    except Exception as error:
        raise UsageError(f"--model: {spec}(d_in={d_in}, d_out={d_out}) raised "
                         f"{type(error).__name__}: {_first_line(error)}; allowed: a function "
                         "that returns an nn.Module") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model: {spec}(d_in={d_in}, d_out={d_out}) returned a "
                         f"{type(model).__name__}; allowed: a function that returns an "
                         "nn.Module")
    return model


def config_model(config: TrainConfig) -> nn.Module:
    """The run's model for a resolved config: --model's, else the MLP of --hidden. It draws
    its initial weights from torch's global generator: seed it first."""
    if config.model:
        return import_model(config.model, d_in=config.d_in, d_out=config.d_out,
                            kwargs=config.model_kwargs)
    return build_model(config.d_in, config.hidden, config.d_out)


def seeded_model(config: TrainConfig) -> nn.Module:
    """``torch.manual_seed(seed)``, then the model: its weights do not depend on the data."""
    torch.manual_seed(config.seed)
    return config_model(config)


# --save's metadata: how to build the trained model again (distnn.tools.sample reads it)
RECIPE = ("distnn.model", "distnn.model_args", "distnn.d_in", "distnn.d_out", "distnn.hidden")


def model_recipe(config: TrainConfig) -> dict[str, str]:
    """How to build ``config``'s model again, untrained, as safetensors metadata (text
    values): --model ("" for the MLP), --model-args, the sizes and the MLP's --hidden."""
    return dict(zip(RECIPE, (config.model or "", json.dumps(config.model_kwargs),
                             str(config.d_in), str(config.d_out),
                             json.dumps(list(config.hidden or ()))), strict=True))


def model_from_recipe(recipe: Mapping[str, str], *, where: str) -> tuple[nn.Module, int, int]:
    """The model, untrained, that a :func:`model_recipe` of ``where`` (a file) describes,
    with its d_in and d_out. UsageError when the recipe is missing or not one distnn wrote."""
    if not all(key in recipe for key in RECIPE):
        raise UsageError(f"{where} does not say which model it holds (no distnn.model in its "
                         "metadata); allowed: a file distnn.train's --save wrote, or its "
                         "checkpoint's (distnn.fit's model is yours: call "
                         "distnn.models.sampling.generate on it)")
    try:
        kwargs = json.loads(recipe["distnn.model_args"])
        hidden = json.loads(recipe["distnn.hidden"])
        d_in, d_out = int(recipe["distnn.d_in"]), int(recipe["distnn.d_out"])
        if not (isinstance(kwargs, dict) and isinstance(hidden, list) and d_in > 0 and d_out > 0
                and all(type(width) is int and width > 0 for width in hidden)):
            raise ValueError("values of the wrong kind")
    except ValueError as error:  # JSONDecodeError is one
        raise UsageError(f"{where}: its distnn metadata is damaged ({error}); allowed: a file "
                         "distnn.train's --save wrote, unchanged") from None
    spec = recipe["distnn.model"]
    if not spec:
        return build_model(d_in, hidden, d_out), d_in, d_out
    try:
        return import_model(spec, d_in=d_in, d_out=d_out, kwargs=kwargs), d_in, d_out
    except UsageError as error:  # (it speaks of --model: the flag the file was trained with)
        raise UsageError(f"{where} was trained with --model {spec}, which cannot be built "
                         f"here: {error}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
