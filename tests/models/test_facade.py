"""The product brief's in-process API on the offline defaults."""

import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from core.settings import Settings
from models import Step1XMedium


@pytest.fixture
def model(tiny_models):
    return Step1XMedium(version="medium", device="cpu", precision="fp32",
                        settings=Settings(models_dir=tiny_models.parent))


def photo_and_mask():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    mask = Image.new("L", image.size)
    ImageDraw.Draw(mask).rectangle((60, 40, 100, 80), fill=255)
    return image, mask


def test_the_brief_snippet_runs_and_saves(model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        out = model.generate(prompt="a white sneaker", steps=2, guidance_scale=7.5, width=96, height=72, seed=1)
    [path] = out.save(tmp_path / "generated_image.png")
    assert Image.open(path).size == (96, 72)
    assert "no model profile 'medium' is configured; using the offline default 'tiny-sd'" in caplog.text
    again = model.generate(prompt="a white sneaker", steps=2, width=96, height=72, seed=1)
    assert np.array_equal(np.asarray(again.image), np.asarray(out.image))
    several = model.generate(prompt="a mug", steps=2, width=64, height=64, seed=5, num_images=3)
    paths = several.save(tmp_path / "mug.png")
    assert [p.name for p in paths] == ["mug.png", "mug-1.png", "mug-2.png"]
    assert [r.seed for r in several.results] == [5, 6, 7]


@pytest.mark.parametrize("mode", ["fill", "structure", "text"])
def test_inpaint_in_every_mode(model, mode):
    image, mask = photo_and_mask()
    out = model.inpaint(image, mask, mode=mode, prompt="a vase" if mode == "text" else None, steps=2, seed=3)
    assert out.image.size == image.size
    inside = np.asarray(mask) > 0
    changed = np.any(np.asarray(out.image) != np.asarray(image), axis=-1)
    assert changed[inside].mean() > 0.5  # the masked region was redrawn
    far = np.ones_like(inside)
    far[30:90, 50:110] = False  # well outside the feathered edge
    assert not changed[far].any()


def test_upscale_4x_with_a_configured_profile(tiny_models):
    settings = Settings(models_dir=tiny_models.parent, default_models={
        "generate": "tiny-sd", "inpaint.fill": "classical-fill", "inpaint.text": "tiny-sd-inpaint",
        "inpaint.structure": "tiny-sd-controlnet", "upscale": "lanczos-x4"})
    model = Step1XMedium(settings=settings, device="cpu")
    image, _ = photo_and_mask()
    assert model.upscale(image, scale=4).image.size == (640, 480)


def test_the_api_process_never_imports_torch():
    code = "import sys, api.app; api.app.create_app(migrate=False); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
