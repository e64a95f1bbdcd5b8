import io

import pytest
from PIL import Image
from pydantic import ValidationError

from core.formats import PNG_LEVEL, encode
from core.settings import Settings


def test_png_outputs_are_lossless_at_every_compression_level() -> None:
    gradient = Image.linear_gradient("L").resize((128, 96)).convert("RGB")
    encoded = {level: encode(gradient, "png", png_level=level) for level in (0, 1, PNG_LEVEL, 9)}
    for data in encoded.values():
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.format == "PNG" and decoded.tobytes() == gradient.tobytes()
    assert len(encoded[0]) > len(encoded[1]) > len(encoded[9])
    assert encode(gradient) == encoded[PNG_LEVEL]


def test_the_png_compression_level_is_one_zlib_takes() -> None:
    assert Settings(png_compress_level=9).png_compress_level == 9
    with pytest.raises(ValidationError, match="png_compress_level"):
        Settings(png_compress_level=10)
