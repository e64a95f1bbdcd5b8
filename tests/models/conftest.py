"""Shared model fixtures: the offline tiny pipelines, built once per session, and profiles for them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.settings import ModelProfile, Settings
from models.tiny import build_tiny

ProfileFactory = Callable[..., ModelProfile]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread for every model test module, restored after each module.

    With a busy neighbour process on two cores, a second OpenMP thread spin-waits for its share:
    the upscaler tests ran 8x slower (alone it would save under half the time), and each call of
    the 64 px tiny diffusion models, which gain nothing from a second thread, stalled by seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Root of the tiny pipelines, laid out where the default profiles expect them (models_dir/tiny)."""
    yield build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_profile(tiny_models: Path) -> ProfileFactory:
    """`tiny_profile("tiny-sd", device="cpu")`: a default tiny profile from the real settings, with
    overrides, so the tests also prove the default profiles match the tiny layout."""
    profiles = Settings(models_dir=tiny_models.parent).models

    def make(name: str, **overrides: Any) -> ModelProfile:
        return profiles[name].model_copy(update=overrides)

    return make
