"""The engine's cooperative progress callback: called after every diffusion step and upscale tile
pass with (done, total), and a False answer stops the run there, returning nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.diffusion import DiffusionEngine
from models.engine import Canceled, ImageRequest
from models.tiling import TileSpec, upscale_tiled


def test_diffusion_reports_every_step_of_every_pass_and_stops_when_told(tiny_profile):
    engine = DiffusionEngine("tiny-sd", tiny_profile("tiny-sd", device="cpu"))
    # Two passes (different step counts cannot share one): progress runs over both.
    requests = [ImageRequest(kind="generate", prompt="a", width=64, height=64, steps=3, seed=1),
                ImageRequest(kind="generate", prompt="b", width=64, height=64, steps=2, seed=2)]
    seen: list[tuple[int, int]] = []
    with engine.watched(lambda done, total: seen.append((done, total)) or True):
        assert len(engine.run(requests)) == 2
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    calls: list[int] = []
    with engine.watched(lambda done, total: calls.append(done) or done < 2), pytest.raises(Canceled):
        engine.run(requests)
    assert calls == [1, 2]  # stopped at the step it was told to, not at the end of the pass
    assert len(engine.run(requests[:1])) == 1  # outside the block nothing watches


def test_tiled_upscaling_reports_each_pass_and_can_be_stopped():
    net = nn.Upsample(scale_factor=4, mode="nearest")
    image = np.zeros((96, 96, 3), np.uint8)
    spec = TileSpec(scale=4, context=4)
    passes: list[tuple[int, int]] = []
    upscale_tiled(net, [image], spec, 32, 48 * 48 * 16, torch.device("cpu"), torch.float32,
                  after_pass=lambda done, total: passes.append((done, total)))
    assert passes == [(i, 9) for i in range(1, 10)]  # 3 x 3 tiles, one per pass at this budget

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Canceled("stop")

    with pytest.raises(Canceled):
        upscale_tiled(net, [image], spec, 32, 48 * 48 * 16, torch.device("cpu"), torch.float32,
                      after_pass=stop_after_two)
