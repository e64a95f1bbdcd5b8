"""`python -m bench.gpu` on tiny configs and a CPU: the code that measures the CUDA path runs end to end
(the figures themselves only mean something on a GPU; the README gives one run's)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from bench import gpu


def test_every_section_is_measured_and_saved_as_it_goes() -> None:
    saved: list[list[str]] = []
    results = gpu.run(tiny=True, steps=2, batches=(1, 2), repeats=1, compile_unet=False,
                      save=lambda r: saved.append(list(r)))
    assert [s[-1] for s in saved] == ["peak_flops", "precision", "batches", "layouts"]
    # fp16 convolutions are not a CPU path, so a CPU run measures fp32 and bf16.
    assert [row["precision"] for row in results["precision"]] == ["fp32", "bf16"]
    assert [(row["batch"], row["layout"]) for row in results["batches"]] == [
        (1, "nchw"), (1, "channels_last"), (2, "nchw"), (2, "channels_last")]
    for row in results["batches"]:
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["seconds"])
        assert row["utilisation_vs_measured"] > 0 and row["utilisation_vs_datasheet"] is None  # no datasheet CPU
    assert [(row["images"], row["layout"], row["mode"]) for row in results["layouts"]] == [
        (images, layout, "eager") for images in (1, 8) for layout in ("nchw", "channels_last")]


def test_flops_are_counted_per_latent() -> None:
    pipe = gpu.build_pipeline(gpu.TINY, torch.device("cpu"), torch.float32)
    one_image, four_images = gpu.unet_flops(pipe, 2), gpu.unet_flops(pipe, 8)
    assert one_image > 0 and four_images == 4 * one_image


def test_utilisation_and_datasheet_peaks() -> None:
    # 1 TFLOP per image step, 30 steps, 8 images in 2 s on a 1 PFLOP/s card: 12%.
    assert gpu.utilisation(1e12, 30, 8, 2.0, 1e15) == pytest.approx(0.12)
    assert gpu.utilisation(1e12, 30, 8, 2.0, None) is None
    assert gpu.datasheet_peak("NVIDIA H200") == 989.4e12
    assert gpu.datasheet_peak("NVIDIA H100 PCIe") == 756.5e12
    assert gpu.datasheet_peak("NVIDIA GeForce GTX 1080") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_to_run_without_cuda_unless_tiny(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[Any]) -> None:
    monkeypatch.setattr(sys, "argv", ["python -m bench.gpu"])
    with pytest.raises(SystemExit) as exit_info:
        gpu.main()
    assert exit_info.value.code == 2 and "no CUDA device is visible" in capsys.readouterr().err
