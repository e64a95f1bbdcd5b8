"""Strict JSON, metadata limits, the mask convention, download names and the weights check."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from core.limits import check_metadata, depth, loads
from core.masks import as_mask, coverage
from core.settings import Settings
from core.specs import parse_items
from core.storage import attachment


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, max_metadata_bytes=100, max_json_depth=4)


@pytest.mark.parametrize(("text", "reason"), [
    ('{"a": NaN}', "NaN is not valid JSON"),
    ('[Infinity]', "Infinity is not valid JSON"),
    ('[1e999]', "too large"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 4 levels"),  # past the recursion limit
    ("[[[[[1]]]]]", "nested deeper than 4 levels"),
    ('{"a": [[[{"b": "]]]]"}]]]}', "nested deeper than 4 levels"),  # closers in a string hide nothing
    ('{"a": 1,}', "line 1, column 9"),
    (b'["\xff"]', "not UTF-8 (byte 2)"),
    ("1" * 5000, "digits"),
])
def test_loads_refuses_what_postgresql_or_recursion_would_choke_on(text, reason):
    with pytest.raises(json.JSONDecodeError) as caught:
        loads(text, 4)
    assert reason in caught.value.msg


def test_loads_and_depth_accept_ordinary_json():
    assert loads('{"a": [1, 2.5, "x", null]}', 4) == {"a": [1, 2.5, "x", None]}
    assert (depth(1, 4), depth([], 4), depth({"a": [{}]}, 4)) == (0, 1, 3)
    # Brackets inside strings count towards the shortcut's bound, never towards the depth.
    assert loads('{"a": "[[[[[[{{{{", "b": [[[1]]]}', 4) == {"a": "[[[[[[{{{{", "b": [[[1]]]}


def test_metadata_limits_name_the_field(settings):
    assert check_metadata({"a": 1}, settings) == []
    for value, message in (([1], "JSON object"), ({"a": "x" * 200}, "at most 100"),
                           ({"a": float("nan")}, "NaN"), ({"a": [[[[1]]]]}, "nested deeper")):
        [error] = check_metadata(value, settings, item="line 3")
        assert (error.field, error.item) == ("metadata", "line 3") and message in error.message


def test_a_mask_is_its_grey_level_over_black():
    opaque = Image.new("L", (4, 4))
    opaque.putpixel((0, 0), 128)
    assert coverage(opaque) == 1 / 16
    alpha = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    alpha.putpixel((1, 1), (255, 255, 255, 255))  # the region drawn in alpha on white
    assert coverage(alpha) == 1 / 16 and as_mask(alpha).getpixel((1, 1)) == 255
    assert coverage(Image.new("RGBA", (4, 4), (0, 0, 0, 255))) == 0.0
    assert coverage(Image.new("RGB", (4, 4), (9, 9, 9))) == 1.0


@pytest.mark.parametrize("name", ['a"b.png', "x\x00y.png", "../../etc.png", "été 👟.png", "a\\b;c=d.png"])
def test_download_names_cannot_break_the_header(name):
    header = attachment(name)
    fallback = header.split('filename="', 1)[1].split('"', 1)[0]
    assert header.isascii() and all(32 <= ord(c) < 127 for c in header)
    assert not set(fallback) & set('"\\/%')
    assert header.count('"') == 2


def test_models_without_weights_are_refused_at_submit(tmp_path):
    settings = Settings(data_dir=tmp_path)
    item = {"custom_id": "u", "kind": "upscale", "image": "a" * 64}
    _, errors = parse_items([item], settings)
    assert [(e.item, e.field) for e in errors] == [("u", "model")] and "not installed" in errors[0].message
    weights = settings.models[settings.default_models["upscale"]].weights  # the default upscaler
    assert weights is not None
    (tmp_path / "models").mkdir()
    open(weights, "wb").close()
    assert parse_items([item], settings)[1] == []
