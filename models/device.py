"""Which device and number format a model profile runs with, and on how many CPU threads torch runs.

Profiles say "auto" by default: the first GPU in fp16 when there is one, else the CPU in fp32. On
the CPU fp16 is refused rather than quietly replaced: many CPU kernels lack it and the rest are
slow, so a profile asking for it was written for a GPU and should say what it wants here.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from core.errors import ConfigError

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def limit_cpu_threads(threads: int | None) -> int:
    """Run this process's torch CPU work on `threads` threads; returns the number it runs on.

    Unset: as OMP_NUM_THREADS says where it is set (torch reads it), else one fewer than the cores
    this process may use, at least one. torch's own default, one per core, leaves none for the
    worker's storing threads and the services beside it, and an OpenMP thread that loses its core
    stalls the others at every step: 16 tiny-SD images at 30 steps on 2 cores took 0.20 s on two
    threads alone and 0.69 s beside one busy process, 0.22 s on one thread either way
    (`python -m bench.threads`)."""
    if threads is None:
        if "OMP_NUM_THREADS" in os.environ:
            return torch.get_num_threads()
        threads = max(1, _usable_cores() - 1)
    torch.set_num_threads(threads)
    return threads


def _usable_cores() -> int:
    """The cores this process may run on: its affinity (a cpuset, taskset) where the OS has one,
    capped by its cgroup's CPU quota (a container's CPU limit, which the affinity does not show)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 here, or not a quota
        pass
    return cores


def resolve_device(name: str) -> torch.device:
    """The device a profile names: "auto" (cuda:0 when present, else cpu), "cpu", "cuda", "cuda:N"."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ConfigError(f"device {name!r} is not one of: auto, cpu, cuda, cuda:N")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        seen = f"{count} CUDA device(s) are visible" if count else "no CUDA device is visible"
        raise ConfigError(f"device {name!r} is not available: {seen} (check CUDA_VISIBLE_DEVICES and the "
                          "torch build), or set the profile's device to auto or cpu")
    return torch.device("cuda", index)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype for a profile's `precision` on that device: "auto" is fp16 on CUDA, fp32 on the CPU."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in _DTYPES:
        raise ConfigError(f"precision {precision!r} is not one of: auto, fp32, fp16, bf16")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 is for CUDA devices; on the CPU use fp32 (fastest here) or bf16, "
                          "or auto")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bf16 support: use fp16 or auto")
    return _DTYPES[precision]


def describe_device() -> tuple[str, int | None]:
    """What this process computes on, for the workers table: the first visible GPU's name and total
    memory, or "cpu"."""
    if not torch.cuda.is_available():
        return "cpu", None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def allocated_bytes() -> int | None:
    """GPU memory torch holds now in this process (None on a CPU)."""
    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
