"""torch's CPU threads in a process that runs engines (`models.device.limit_cpu_threads`). Thread
counts are the whole process's: each case runs in a Python of its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import torch
from core.settings import Settings
from models import device
from models.profiles import Registry
Registry(Settings())
print(torch.get_num_threads(), device._usable_cores())
"""


def threads_after_registry(**env: str) -> tuple[int, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "STEP1X_CPU_THREADS")}
    out = subprocess.run([sys.executable, "-c", CHECK], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return int(out[0]), int(out[1])


def test_unset_leaves_one_core_free_and_at_least_one_thread() -> None:
    threads, cores = threads_after_registry()  # cores: the affinity under a container's quota, tested below
    assert threads == max(1, cores - 1)


def test_the_setting_decides_over_omp_num_threads() -> None:
    assert threads_after_registry(STEP1X_CPU_THREADS="3")[0] == 3
    assert threads_after_registry(STEP1X_CPU_THREADS="3", OMP_NUM_THREADS="2")[0] == 3


def test_without_the_setting_omp_num_threads_is_left_to_torch() -> None:
    own = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert threads_after_registry(OMP_NUM_THREADS="2")[0] == int(own)


def test_zero_threads_is_refused_at_start() -> None:
    from pydantic import ValidationError

    from core.settings import Settings

    with pytest.raises(ValidationError, match="cpu_threads"):
        Settings(cpu_threads=0)


@pytest.mark.parametrize(("cpu_max", "cores"), [("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", 8),
                                                (None, 8), ("", 8)])
def test_a_containers_cpu_quota_caps_the_cores(tmp_path, monkeypatch, cpu_max, cores) -> None:
    """Eight cores in the affinity; the cgroup's quota, where it sets one, rounded up."""
    from models import device

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    monkeypatch.setattr(device, "CGROUP_CPU_MAX", path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    assert device._usable_cores() == cores
