"""The weight-free engines: classical object removal and Lanczos upscaling, on shipped photos."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from core.errors import InvalidInput
from core.settings import ModelProfile
from models import classical
from models.classical import BIHARMONIC_MAX_PIXELS, ClassicalFillEngine, LanczosUpscaleEngine, choose_method
from models.engine import ImageRequest
from models.evaluate import centre_square, photo


@pytest.fixture(scope="module")
def engine() -> ClassicalFillEngine:
    return ClassicalFillEngine("classical-fill", ModelProfile(task="inpaint", engine="classical"))


def fill_request(image: Image.Image, mask: Image.Image) -> ImageRequest:
    return ImageRequest(kind="inpaint", mode="fill", image=image, mask=mask)


def strokes_mask(size: tuple[int, int], width: int) -> np.ndarray:
    canvas = np.zeros((size[1], size[0]), np.uint8)
    for start, end in [((10, 20), (250, 60)), ((30, 150), (200, 30)), ((100, 180), (280, 120))]:
        cv2.line(canvas, start, end, 255, width)
    return canvas


def test_fill_keeps_size_and_every_pixel_outside_the_mask(engine: ClassicalFillEngine) -> None:
    image = photo("chelsea").crop((40, 100, 340, 300))  # 300x200: not square
    mask = np.zeros((200, 300), np.uint8)
    cv2.ellipse(mask, (150, 90), (40, 25), 0, 0, 360, 255, -1)
    mask[mask > 0] = 7  # any non-zero value means "redraw"
    [result] = engine.run([fill_request(image, Image.fromarray(mask))])
    out, before = np.asarray(result.image), np.asarray(image)
    assert result.image.size == image.size and result.image.mode == "RGB"
    assert np.array_equal(out[mask == 0], before[mask == 0])
    assert np.abs(out[mask > 0].astype(int) - before[mask > 0]).mean() > 1  # the hole was redrawn
    assert result.model == "classical-fill" and len(result.model_hash) == 16


def test_mask_shape_picks_the_method() -> None:
    assert choose_method(strokes_mask((300, 200), 2) > 0) == "biharmonic"
    assert choose_method(strokes_mask((300, 200), 12) > 0) == "blend"
    assert choose_method(centre_square(0.05)) == "blend"
    side = int(BIHARMONIC_MAX_PIXELS ** 0.5) + 10
    assert choose_method(np.ones((side, side), bool)) == "telea"


def test_centre_square_of_5_percent_fills_above_28_db(engine: ClassicalFillEngine) -> None:
    image, mask = photo("chelsea"), centre_square(0.05)
    [result] = engine.run([fill_request(image, Image.fromarray(mask))])
    assert peak_signal_noise_ratio(np.asarray(image), np.asarray(result.image)) > 28


def test_a_small_mask_on_a_large_photo_only_fills_a_crop(engine: ClassicalFillEngine,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    large = photo("coffee").resize((3000, 3000))
    mask = np.zeros((3000, 3000), np.uint8)
    mask[2000:2040, 700:760] = 255
    seen = []
    inpaint = classical.inpaint

    def spy(image: np.ndarray, region: np.ndarray, method: classical.FillMethod) -> np.ndarray:
        seen.append(image.shape)
        return inpaint(image, region, method)

    monkeypatch.setattr(classical, "inpaint", spy)
    [result] = engine.run([fill_request(large, Image.fromarray(mask))])
    assert len(seen) == 1 and max(seen[0][:2]) <= 60 + 2 * 32
    # The context is wide enough that the crop fills as a much wider view of the photo would.
    wide = (slice(1800, 2300), slice(500, 1000))
    reference = inpaint(np.asarray(large)[wide], mask[wide] > 0, choose_method(mask > 0))
    assert np.abs(np.asarray(result.image)[wide].astype(int) - reference).max() <= 1


def _square_mask(size: int, side: int) -> Image.Image:
    mask = Image.new("L", (size, size))
    mask.paste(255, (0, 0, side, side))
    return mask


@pytest.mark.parametrize(("change", "field"), [
    ({"mask": Image.new("L", (64, 32), 255)}, "mask"),
    ({"mask": Image.new("L", (64, 64), 0)}, "mask"),
    ({"mask": Image.new("L", (64, 64), 255)}, "mask"),  # nothing left to fill from
    ({"image": Image.new("RGB", (1, 1)), "mask": Image.new("L", (1, 1), 255)}, "mask"),
    ({"mode": "text"}, "mode"),
    ({"kind": "upscale"}, "kind"),
])
def test_bad_fill_requests_name_the_field(engine: ClassicalFillEngine, change: dict, field: str) -> None:
    fields = {"image": Image.new("RGB", (64, 64)), "mask": _square_mask(64, 8), "label": "item-3"}
    request = ImageRequest(**{"kind": "inpaint", "mode": "fill", **fields, **change})
    with pytest.raises(InvalidInput) as caught:
        engine.run([request])
    assert [(e.field, e.item) for e in caught.value.errors] == [(field, "item-3")]


@pytest.mark.parametrize("size", [(2, 1), (1, 2), (7, 1), (200, 3)])
def test_fill_works_on_images_thinner_than_its_context(engine: ClassicalFillEngine, size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (200, 40, 10))
    image.putpixel((0, 0), (0, 0, 0))
    mask = Image.new("L", size)
    mask.putpixel((0, 0), 255)
    result = engine.run([ImageRequest(kind="inpaint", mode="fill", image=image, mask=mask)])[0].image
    assert result.size == size
    assert result.getpixel((0, 0)) != (0, 0, 0)  # filled from its neighbour, not left as it was


def test_a_mask_drawn_in_the_alpha_channel_masks_only_that_region(engine: ClassicalFillEngine) -> None:
    image = photo("rocket").resize((64, 64))
    alpha = _square_mask(64, 16)
    white = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    white.putalpha(alpha)  # white everywhere; the region is where it is opaque
    result = engine.run([ImageRequest(kind="inpaint", mode="fill", image=image, mask=white)])[0].image
    outside = np.asarray(result)[16:, 16:]
    assert np.array_equal(outside, np.asarray(image)[16:, 16:])
    assert not np.array_equal(np.asarray(result)[:16, :16], np.asarray(image)[:16, :16])


def test_lanczos_upscales_by_the_requested_scale() -> None:
    engine = LanczosUpscaleEngine("lanczos-x4", ModelProfile(task="upscale", engine="lanczos"))
    image = photo("rocket").resize((37, 23))
    results = engine.run([ImageRequest(kind="upscale", image=image), ImageRequest(kind="upscale", image=image,
                                                                                  scale=2)])
    assert [r.image.size for r in results] == [(148, 92), (74, 46)]
    with pytest.raises(InvalidInput) as caught:
        engine.check_inputs([ImageRequest(kind="upscale", image=image, scale=16)])
    assert caught.value.errors[0].field == "scale"
