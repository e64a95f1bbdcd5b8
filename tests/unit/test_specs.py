import pytest

from core.settings import Settings
from core.specs import GenerateSpec, InpaintSpec, generation_bucket, parse_items

FILE_A, FILE_B = "a" * 64, "b" * 64


@pytest.fixture
def settings(tmp_path):
    # The default upscaler's weights are not pulled here; test_models_without_weights covers that check.
    return Settings(data_dir=tmp_path, check_weights_at_submit=False)


def validate_items(items, settings, **options):
    specs, errors = parse_items(items, settings, **options)
    assert errors == []
    return specs


def errors_of(items, settings):
    _, errors = parse_items(items, settings)
    assert errors
    return {(e.item, e.field): e.message for e in errors}


def test_valid_items_get_model_and_seed(settings):
    specs = validate_items([
        {"custom_id": "g", "kind": "generate", "prompt": "a mug"},
        {"custom_id": "f", "kind": "inpaint", "mode": "fill", "image": FILE_A, "mask": FILE_B},
        {"custom_id": "u", "kind": "upscale", "image": FILE_A, "seed": 5},
    ], settings)
    assert [s.model for s in specs] == ["tiny-sd", "classical-fill", settings.default_models["upscale"]]
    assert all(s.seed is not None for s in specs)
    assert specs[2].seed == 5


def test_every_bad_item_is_named_with_its_field(settings):
    found = errors_of([
        {"custom_id": "ok", "kind": "generate", "prompt": "fine"},
        {"custom_id": "steps", "kind": "generate", "prompt": "x", "steps": 0},
        {"custom_id": "mode", "kind": "inpaint", "mode": "erase", "image": FILE_A, "mask": FILE_B},
        {"custom_id": "text", "kind": "inpaint", "mode": "text", "image": FILE_A, "mask": FILE_B},
        {"custom_id": "kind", "kind": "paint"},
        {"custom_id": "model", "kind": "generate", "prompt": "x", "model": "nope"},
        {"custom_id": "wrongtask", "kind": "generate", "prompt": "x", "model": "lanczos-x4"},
        {"custom_id": "edges", "kind": "inpaint", "mode": "fill", "image": FILE_A, "mask": FILE_B, "edges": FILE_A},
        {"custom_id": "canny", "kind": "inpaint", "mode": "structure", "image": FILE_A, "mask": FILE_B,
         "canny_low": 200, "canny_high": 100},
        {"custom_id": "fileid", "kind": "upscale", "image": "not-a-file-id"},
        {"custom_id": "extra", "kind": "upscale", "image": FILE_A, "colour": "red"},
    ], settings)
    assert ("ok", "steps") not in found
    assert set(found) == {
        ("steps", "steps"), ("mode", "mode"), ("text", "prompt"), ("kind", "kind"), ("model", "model"),
        ("wrongtask", "model"), ("edges", "edges"), ("canny", "canny_low"), ("fileid", "image"), ("extra", "colour"),
    }
    assert "text mode needs a prompt" in found[("text", "prompt")]
    assert "unknown model 'nope'" in found[("model", "model")]


def test_custom_ids_are_required_and_unique_in_a_batch(settings):
    found = errors_of([
        {"custom_id": "a", "kind": "generate", "prompt": "x"},
        {"custom_id": "a", "kind": "generate", "prompt": "y"},
        {"kind": "generate", "prompt": "z"},
    ], settings)
    assert found[("a", "custom_id")] == "appears more than once in this batch"
    assert "needs a custom_id" in found[("#2", "custom_id")]


def test_single_jobs_need_no_custom_id(settings):
    [spec] = validate_items([{"kind": "generate", "prompt": "x"}], settings, require_custom_id=False)
    assert isinstance(spec, GenerateSpec)


def test_size_over_the_budget_is_refused(settings):
    found = errors_of([
        {"custom_id": "big", "kind": "generate", "prompt": "x", "width": 2048, "height": 512},
    ], settings)
    assert "exceeds 1024 px per side" in found[("big", "width")]
    many = settings.model_copy(update={"models": {**settings.models}})
    many.models["tiny-sd"] = many.models["tiny-sd"].model_copy(update={"pixel_budget": 64 * 64})
    found = errors_of([{"custom_id": "n", "kind": "generate", "prompt": "x", "num_images": 2}], many)
    assert "budget" in found[("n", "num_images")]


def test_a_verdict_checked_once_per_combination_still_names_each_item(settings):
    """parse_items checks each (model, mode, size) combination once: an item sharing a bad item's
    combination gets the same error under its own name, and a neighbour of another size none."""
    specs, errors = parse_items([
        {"custom_id": f"big-{i}", "kind": "generate", "prompt": "x", "width": 2048, "height": 512} for i in range(3)
    ] + [
        {"custom_id": "fine", "kind": "generate", "prompt": "x", "width": 1024, "height": 512},
        {"custom_id": "fill", "kind": "inpaint", "mode": "fill", "image": FILE_A, "mask": FILE_B},
        {"custom_id": "text", "kind": "inpaint", "mode": "text", "prompt": "a lid", "image": FILE_A, "mask": FILE_B,
         "model": "classical-fill"},
    ], settings)
    assert [(e.item, e.field) for e in errors] == [("big-0", "width"), ("big-1", "width"), ("big-2", "width"),
                                                   ("text", "model")]
    assert "only does fill mode" in errors[-1].message
    assert [s.custom_id for s in specs] == ["fine", "fill"]


@pytest.mark.parametrize(("size", "native", "bucket"), [
    ((512, 512), 512, (512, 512)),
    ((1024, 1024), 512, (512, 512)),
    ((512, 768), 512, (448, 640)),
    ((3000, 1000), 1024, (1792, 640)),
    ((512, 512), 64, (64, 64)),
    ((64, 64), 512, (64, 64)),
])
def test_generation_buckets_keep_aspect_within_native_area(size, native, bucket):
    w, h = generation_bucket(*size, native)
    assert (w, h) == bucket
    assert w * h <= native * native * 1.15


def test_inpaint_defaults(settings):
    [spec] = validate_items([{"custom_id": "s", "kind": "inpaint", "mode": "structure", "image": FILE_A,
                              "mask": FILE_B}], settings)
    assert isinstance(spec, InpaintSpec)
    assert (spec.canny_low, spec.canny_high, spec.model) == (100, 200, "tiny-sd-controlnet")
