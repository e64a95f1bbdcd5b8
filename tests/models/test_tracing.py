"""Traced module calls (models.tracing): the same outputs as eager, a trace per signature, eager when
a call cannot be traced; and the diffusion engines drawing the same pixels traced as eager."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch

from models.diffusion import ControlNetInpaintEngine, DiffusionEngine
from models.tracing import Traced, trace_calls
from tests.models.conftest import ProfileFactory
from tests.models.test_diffusion import gen, inpaint


class Counting(torch.nn.Module):
    """Counts runs of its Python body: a traced call does not run it, a trace or an eager call does."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([2.0]))
        self.runs = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0, flip: bool = False,
                extra: dict[str, Any] | None = None, residuals: list[torch.Tensor] | None = None,
                return_dict: bool = True) -> Any:
        self.runs += 1
        y = x * self.weight * scale
        if flip:  # a Python branch on a value: each value needs its own trace
            y = -y
        for r in residuals or []:
            y = y + r.sum()
        if extra is not None:
            y = y + extra["shift"]
        return {"y": y} if return_dict else (y, [y + 1])


def call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return module(*args, **kwargs)


def test_a_trace_per_signature_then_no_python_and_the_eager_values() -> None:
    module = Counting()
    eager = Counting()
    traced = trace_calls(module)
    cases: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((torch.ones(2, 3),), {}),
        ((torch.ones(2, 3),), {"scale": 0.5}),
        ((torch.ones(2, 3),), {"flip": True}),
        ((torch.ones(2, 3),), {"extra": {"shift": torch.tensor(3.0)}, "residuals": [torch.ones(2), torch.ones(1)]}),
    ]
    for args, kwargs in cases:
        want = call(eager, *args, **kwargs, return_dict=False)
        for _ in range(3):
            got = call(module, *args, **kwargs, return_dict=False)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1][0], want[1][0])
    assert len(traced.traces) == len(cases)
    assert module.runs == len(cases)  # once each, while tracing; the 8 calls after ran the graph only


def test_batch_sizes_share_a_trace_each_checked_once_against_the_module() -> None:
    module = Counting()
    traced = trace_calls(module)
    for rows in (2, 1, 3, 2, 1, 3):
        got, _ = call(module, torch.full((rows, 3), float(rows)), return_dict=False)
        assert torch.equal(got, torch.full((rows, 3), 2.0 * rows))
    assert len(traced.traces) == 1 and not traced.per_batch
    assert module.runs == 3  # the trace at 2, one check each at 1 and 3


class BakesTheBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        return (x * float(x.shape[0]),)  # a Python number from a shape: constant in a trace


def test_a_trace_that_baked_the_batch_size_in_is_caught_and_traced_per_size(
        caplog: pytest.LogCaptureFixture) -> None:
    module = BakesTheBatch()
    traced = trace_calls(module)
    with caplog.at_level(logging.INFO, logger="models.tracing"):
        for rows in (2, 3, 3, 2, 3):
            (got,) = call(module, torch.ones(rows, 4), return_dict=False)
            assert torch.equal(got, torch.full((rows, 4), float(rows)))
    # The first trace still serves its own batch size; 3 got one of its own.
    assert len(traced.per_batch) == 1 and len(traced.traces) == 2 and traced.made == 2
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "BakesTheBatch.forward: a trace did not carry over to batch shapes [(3, 4)]"]


def test_past_its_capacity_a_module_runs_new_signatures_eagerly() -> None:
    # Dropping a trace would not give its memory back (TorchScript keeps the graph), so none is dropped.
    module = Counting()
    traced = Traced(module, capacity=2)
    module.forward = traced  # type: ignore[method-assign]
    for scale in (1.0, 2.0, 3.0, 3.0, 1.0, 2.0):
        (y, _) = call(module, torch.ones(1, 3), scale=scale, return_dict=False)
        assert torch.equal(y, torch.full((1, 3), 2.0 * scale))
    assert traced.made == 2 and len(traced.traces) == 2
    assert module.runs == 4  # two traces, then 3.0 eagerly twice; 1.0 and 2.0 again ran traced


def test_calls_a_trace_cannot_take_run_eagerly() -> None:
    module = Counting()
    traced = trace_calls(module)
    # return_dict=True: diffusers' output classes, which a trace cannot return
    assert torch.equal(call(module, torch.ones(2, 3))["y"], torch.full((2, 3), 2.0))
    # A value that is neither a tensor nor a plain constant (here a NumPy scalar)
    y, _ = call(module, torch.ones(2, 3), extra={"shift": np.float32(3.0)}, return_dict=False)
    assert torch.equal(y, torch.full((2, 3), 5.0))
    assert traced.traces == {} and module.runs == 2


class Untraceable(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        return x + 1, "a string"  # traces return tensors only


def test_a_module_tracing_fails_on_runs_eagerly_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    module = Untraceable()
    traced = trace_calls(module)
    with caplog.at_level(logging.WARNING, logger="models.tracing"):
        first = call(module, torch.ones(2), return_dict=False)
        second = call(module, torch.ones(2), return_dict=False)
    assert first[1] == second[1] == "a string" and torch.equal(first[0], torch.full((2,), 2.0))
    assert traced.broken and traced.traces == {}
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "Untraceable.forward runs eagerly"]


ENGINES = {"tiny-sd": DiffusionEngine, "tiny-sd-inpaint": DiffusionEngine,
           "tiny-sd-controlnet": ControlNetInpaintEngine}


def requests_for(name: str) -> list[list[Any]]:
    """Micro-batches of 3, 1 and 1: made at the first size, checked at the second, then run traced
    at the checked size."""
    if name == "tiny-sd":
        return [[gen(seed=s) for s in (1, 2, 3)], [gen(seed=4)], [gen(seed=5)]]
    mode = "structure" if name == "tiny-sd-controlnet" else "text"
    single = ([inpaint("fill", seed=s)] if mode == "text" else [inpaint(mode, seed=s, prompt="a cup")]
              for s in (4, 5))
    return [[inpaint(mode, seed=s, prompt="a lamp") for s in (1, 2, 3)], *single]


@pytest.mark.parametrize("name", ENGINES)
def test_traced_engines_draw_the_pixels_eager_ones_do(tiny_profile: ProfileFactory, name: str) -> None:
    cls = ENGINES[name]
    traced = cls(name, tiny_profile(name, trace=True))
    eager = cls(name, tiny_profile(name))  # off unless a profile asks
    for batch in requests_for(name):
        want = [r.image.tobytes() for r in eager.run(batch)]
        assert [r.image.tobytes() for r in traced.run(batch)] == want
    modules = [traced.pipe.unet.forward, traced.pipe.vae.decode]
    if name == "tiny-sd-controlnet":
        modules.append(traced.pipe.controlnet.forward)
    for module in modules:  # one trace each, checked at the second batch size
        assert isinstance(module, Traced) and not module.broken and not module.per_batch
        assert [len(entry.shapes) for entry in module.traces.values()] == [2]
    assert not isinstance(eager.pipe.unet.forward, Traced)
