"""The diffusers engines on the offline tiny pipelines: sizes, seeds, batching, crops, errors, caches.

The tiny weights are random, so these tests check plumbing (what goes where, reproducibly), never
what the images look like.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ConfigError, InvalidInput, ModelNotAvailable
from models.caches import LRUCache, PromptEmbeddingCache
from models.device import resolve_device, resolve_dtype
from models.diffusion import ControlNetInpaintEngine, DiffusionEngine
from models.engine import Engine, ImageRequest, Mode, hash_path
from models.resolution import crop_around_mask, feathered
from models.tiny import PARTS, build_tiny, ensure_tiny
from tests.models.conftest import ProfileFactory

STEPS = 3
# Batched CPU matmuls may round differently from single ones; seen here: identical. A few units of
# slack keeps the test about noise independence, not about BLAS kernels.
BATCH_TOLERANCE = 3


@pytest.fixture(scope="module")
def generator(tiny_profile: ProfileFactory) -> DiffusionEngine:
    return DiffusionEngine("tiny-sd", tiny_profile("tiny-sd"))


@pytest.fixture(scope="module")
def inpainter(tiny_profile: ProfileFactory) -> DiffusionEngine:
    return DiffusionEngine("tiny-sd-inpaint", tiny_profile("tiny-sd-inpaint"))


@pytest.fixture(scope="module")
def structure(tiny_profile: ProfileFactory) -> ControlNetInpaintEngine:
    return ControlNetInpaintEngine("tiny-sd-controlnet", tiny_profile("tiny-sd-controlnet"))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def gen(seed: int = 1, **fields: Any) -> ImageRequest:
    defaults = {"width": 64, "height": 64, "prompt": "a red shoe", "steps": STEPS, "label": f"g{seed}"}
    return ImageRequest(kind="generate", seed=seed, **{**defaults, **fields})


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size)
    mask.paste(255, box)
    return mask


def inpaint(mode: Mode, seed: int = 3, image: Image.Image | None = None, mask: Image.Image | None = None,
            **fields: Any) -> ImageRequest:
    if image is None:
        image = photo(160, 120)
    if mask is None:
        mask = box_mask(image.size, (60, 40, 100, 80))
    defaults = {"image": image, "mask": mask, "steps": STEPS, "label": f"i{seed}"}
    return ImageRequest(kind="inpaint", mode=mode, seed=seed, **{**defaults, **fields})


def tiny_profile_weights(engine: DiffusionEngine | ControlNetInpaintEngine) -> str:
    assert engine.profile.weights is not None
    return engine.profile.weights


def error_fields(engine: Engine, req: ImageRequest) -> list[tuple[str, str]]:
    with pytest.raises(InvalidInput) as caught:
        engine.run([req])
    return [(e.field, str(e.item)) for e in caught.value.errors]


# --- tiny pipelines ---------------------------------------------------------------------------------

def test_tiny_build_is_reproducible_idempotent_and_consistent(tiny_models: Path, tmp_path: Path) -> None:
    again = build_tiny(tmp_path / "tiny")
    assert [hash_path(again / p) for p in PARTS] == [hash_path(tiny_models / p) for p in PARTS]
    stamp = (again / "text2img" / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny(again) == again
    assert (again / "text2img" / "model_index.json").stat().st_mtime_ns == stamp
    assert not [p for p in again.iterdir() if p.name.startswith(".")]  # no temp folders left behind

    tokenizer = json.loads((again / "text2img" / "tokenizer" / "tokenizer_config.json").read_text())
    vocab = json.loads((again / "text2img" / "tokenizer" / "vocab.json").read_text())
    encoder = json.loads((again / "text2img" / "text_encoder" / "config.json").read_text())
    assert tokenizer["model_max_length"] == 77
    assert encoder["eos_token_id"] == vocab["<|endoftext|>"]
    unet = json.loads((again / "inpaint" / "unet" / "config.json").read_text())
    control = json.loads((again / "controlnet" / "config.json").read_text())
    assert (unet["in_channels"], control["in_channels"]) == (9, 4)
    assert control["block_out_channels"] == unet["block_out_channels"]
    assert all(sum(f.stat().st_size for f in (again / p).rglob("*")) < 1_000_000 for p in PARTS)


def test_missing_weights_is_model_not_available(tiny_profile: ProfileFactory, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelNotAvailable, match=r"nowhere.*model_index\.json") as caught:
        DiffusionEngine("real-sd", tiny_profile("tiny-sd", weights=str(missing), tiny=False))
    assert "save_pretrained" in str(caught.value)
    with pytest.raises(ModelNotAvailable, match="ensure_tiny"):
        DiffusionEngine("tiny-sd", tiny_profile("tiny-sd", weights=str(missing)))
    with pytest.raises(ModelNotAvailable, match=r"nowhere.*config\.json"):
        ControlNetInpaintEngine("cn", tiny_profile("tiny-sd-controlnet", controlnet=str(missing)))


def test_tiny_load_warns_that_images_are_noise(tiny_profile: ProfileFactory,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="models.diffusion"):
        engine = DiffusionEngine("tiny-sd", tiny_profile("tiny-sd"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "noise" in warnings[0] and "STEP1X_MODELS" in warnings[0]
    assert engine.model_hash == hash_path(tiny_profile_weights(engine))


# --- text-to-image ----------------------------------------------------------------------------------

def test_generate_returns_exact_requested_sizes(generator: DiffusionEngine) -> None:
    sizes = [(64, 64), (100, 70), (72, 128), (200, 64)]
    results = generator.run([gen(seed=i, width=w, height=h) for i, (w, h) in enumerate(sizes)])
    assert [r.image.size for r in results] == sizes
    assert [r.seed for r in results] == [0, 1, 2, 3]
    assert {r.model for r in results} == {"tiny-sd"}


def test_generate_is_reproducible_by_seed(generator: DiffusionEngine) -> None:
    first, again, other = (generator.run([gen(seed=s)])[0].image for s in (7, 7, 8))
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_batch_gives_distinct_outputs_in_order_each_as_if_alone(generator: DiffusionEngine) -> None:
    seeds = [11, 12, 13, 14]
    batch = [pixels(r.image) for r in generator.run([gen(seed=s) for s in seeds])]
    alone = [pixels(generator.run([gen(seed=s)])[0].image) for s in seeds]
    for together, single in zip(batch, alone, strict=True):
        assert np.abs(together - single).max() <= BATCH_TOLERANCE
    assert len({b.tobytes() for b in batch}) == len(seeds)


def test_mixed_batch_is_split_by_parameters_and_keeps_order(generator: DiffusionEngine) -> None:
    mixed = [gen(seed=1), gen(seed=2, width=100, height=70), gen(seed=3, steps=2),
             gen(seed=4, guidance_scale=1.0), gen(seed=5)]
    results = generator.run(mixed)
    assert [r.image.size for r in results] == [(64, 64), (100, 70), (64, 64), (64, 64), (64, 64)]
    for req, result in zip(mixed, results, strict=True):
        alone = generator.run([req])[0].image
        assert np.abs(pixels(result.image) - pixels(alone)).max() <= BATCH_TOLERANCE


# --- inpainting -------------------------------------------------------------------------------------

def test_large_input_small_mask_keeps_all_outside_the_feathered_mask(inpainter: DiffusionEngine) -> None:
    image = photo(1500, 1200)
    mask = box_mask(image.size, (700, 500, 760, 540))
    result = inpainter.run([inpaint("text", image=image, mask=mask, prompt="a blue vase")])[0].image
    assert result.size == image.size

    crop = crop_around_mask(mask, 32)
    weight = Image.new("L", image.size)
    weight.paste(feathered(mask.crop(crop.box), 4), crop.box[:2])
    untouched = np.asarray(weight) == 0
    assert (pixels(result)[untouched] == pixels(image)[untouched]).all()
    inside = np.asarray(mask) > 0
    assert (pixels(result)[inside] != pixels(image)[inside]).any(axis=-1).mean() > 0.5


def test_inpaint_text_and_fill_modes_are_reproducible_and_batch(inpainter: DiffusionEngine) -> None:
    requests = [inpaint("text", seed=1, prompt="a cat"), inpaint("fill", seed=2),
                inpaint("text", seed=3, prompt="a cat", image=photo(90, 200, seed=1),
                        mask=box_mask((90, 200), (0, 150, 30, 200)))]
    results = inpainter.run(requests)
    assert [r.image.size for r in results] == [(160, 120), (160, 120), (90, 200)]
    for req, result in zip(requests, results, strict=True):
        assert np.abs(pixels(result.image) - pixels(inpainter.run([req])[0].image)).max() <= BATCH_TOLERANCE
    first, again = (inpainter.run([requests[0]])[0].image for _ in range(2))
    assert first.tobytes() == again.tobytes()
    other_seed = inpainter.run([inpaint("text", seed=9, prompt="a cat")])[0].image
    assert other_seed.tobytes() != results[0].image.tobytes()


def test_strength_is_passed_through(inpainter: DiffusionEngine) -> None:
    full, partial = (inpainter.run([inpaint("text", prompt="a cat", strength=s)])[0].image
                     for s in (1.0, 0.5))
    assert full.tobytes() != partial.tobytes()


def test_structure_mode_follows_canny_or_supplied_edges(structure: ControlNetInpaintEngine) -> None:
    image = photo(300, 200)
    mask = box_mask(image.size, (100, 60, 180, 140))
    edges = box_mask(image.size, (130, 60, 134, 140))

    def draw(**fields: Any) -> Image.Image:
        req = inpaint("structure", image=image, mask=mask, prompt="a lamp", **fields)
        return structure.run([req])[0].image

    canny, supplied, again = draw(), draw(edges=edges), draw(edges=edges)
    assert canny.size == supplied.size == image.size
    assert canny.tobytes() != supplied.tobytes()
    assert again.tobytes() == supplied.tobytes()
    thresholds = draw(canny_low=10, canny_high=20)
    assert thresholds.tobytes() != canny.tobytes()
    # The output depends on the ControlNet too, so the recorded hash covers both folders.
    base = hash_path(tiny_profile_weights(structure))
    assert len(structure.model_hash) == 16 and structure.model_hash != base


# --- bad inputs ---------------------------------------------------------------------------------------

def test_bad_inputs_name_the_field_and_item(generator: DiffusionEngine, inpainter: DiffusionEngine,
                                            structure: ControlNetInpaintEngine) -> None:
    image = photo(160, 120)
    assert error_fields(inpainter, inpaint("text", prompt="x", mask=box_mask((100, 100), (0, 0, 9, 9)))) \
        == [("mask", "i3")]
    assert error_fields(inpainter, inpaint("fill", mask=Image.new("L", image.size))) == [("mask", "i3")]
    assert error_fields(inpainter, inpaint("text", prompt="  ")) == [("prompt", "i3")]
    assert error_fields(inpainter, inpaint("structure", prompt="x")) == [("mode", "i3")]
    assert error_fields(generator, gen(prompt="")) == [("prompt", "g1")]
    assert error_fields(generator, gen(width=5000)) == [("width", "g1")]
    assert error_fields(generator, inpaint("fill")) == [("kind", "i3")]
    assert error_fields(structure, inpaint("structure", edges=Image.new("L", (10, 10)))) == [("edges", "i3")]
    assert error_fields(structure, inpaint("text", prompt="x")) == [("mode", "i3")]
    with pytest.raises(InvalidInput, match="mask is empty"):
        inpainter.run([inpaint("fill", mask=Image.new("L", image.size))])


def test_every_bad_item_of_a_batch_is_reported_at_once(generator: DiffusionEngine) -> None:
    with pytest.raises(InvalidInput) as caught:
        generator.run([gen(seed=1), gen(seed=2, prompt=""), gen(seed=3, prompt="")])
    assert [(e.field, e.item) for e in caught.value.errors] == [("prompt", "g2"), ("prompt", "g3")]


# --- caches -----------------------------------------------------------------------------------------

def test_repeated_prompt_is_encoded_once(tiny_profile: ProfileFactory) -> None:
    cache = PromptEmbeddingCache(capacity=8)
    engine = DiffusionEngine("tiny-sd", tiny_profile("tiny-sd"), prompt_cache=cache)
    engine.run([gen(seed=1), gen(seed=2), gen(seed=3, negative_prompt="blurry")])
    assert (cache.misses, cache.hits, len(cache)) == (2, 1, 2)
    engine.run([gen(seed=4)])
    engine.run([gen(seed=5, guidance_scale=1.0)])  # unguided needs no negative: its own entry
    assert (cache.misses, cache.hits, len(cache)) == (3, 2, 3)


class Closable:
    def __init__(self, name: str, closed: list[str]) -> None:
        self.name, self._closed = name, closed

    def close(self) -> None:
        self._closed.append(self.name)


def test_lru_evicts_least_recently_used_and_closes_it() -> None:
    closed: list[str] = []
    cache: LRUCache[str, Closable] = LRUCache(2)
    cache.put("a", Closable("a", closed))
    cache.put("b", Closable("b", closed))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("c", Closable("c", closed))
    assert (cache.keys(), closed) == (["a", "c"], ["b"])
    assert cache.get("b") is None
    assert cache.get_or_create("d", lambda: Closable("d", closed)).name == "d"
    assert (cache.keys(), closed) == (["c", "d"], ["b", "a"])
    assert (cache.hits, cache.misses, cache.evictions) == (1, 2, 2)
    cache.clear()
    assert len(cache) == 0 and sorted(closed) == ["a", "b", "c", "d"]


def test_lru_concurrent_creators_share_one_value() -> None:
    closed: list[str] = []
    cache: LRUCache[str, Closable] = LRUCache(4)
    barrier = threading.Barrier(4)

    def create() -> Closable:
        barrier.wait()  # all four miss before any inserts
        return Closable("x", closed)

    got: list[Closable] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get_or_create("k", create)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(v) for v in got}) == 1 and len(closed) == 3 and len(cache) == 1


def test_engine_close_releases_the_pipeline(tiny_profile: ProfileFactory) -> None:
    engines: LRUCache[str, DiffusionEngine] = LRUCache(1)
    first = engines.get_or_create("tiny-sd", lambda: DiffusionEngine("tiny-sd", tiny_profile("tiny-sd")))
    engines.get_or_create("tiny-sd-inpaint",
                          lambda: DiffusionEngine("tiny-sd-inpaint", tiny_profile("tiny-sd-inpaint")))
    assert first.pipe is None and engines.keys() == ["tiny-sd-inpaint"]


# --- device and precision ---------------------------------------------------------------------------

def test_device_and_precision_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp32"):
        resolve_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="not one of"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="not available"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


def test_bf16_on_cpu_and_wrong_task_profiles(tiny_profile: ProfileFactory) -> None:
    engine = ControlNetInpaintEngine("cn", tiny_profile("tiny-sd-controlnet", precision="bf16"))
    assert engine.pipe.unet.dtype == engine.pipe.controlnet.dtype == torch.bfloat16
    assert engine.run([inpaint("structure")])[0].image.size == (160, 120)
    with pytest.raises(ConfigError, match="does inpaint, not generate"):
        ControlNetInpaintEngine("cn", tiny_profile("tiny-sd-controlnet", task="generate"))
    with pytest.raises(ConfigError, match="not upscale"):
        DiffusionEngine("sd", tiny_profile("tiny-sd", task="upscale"))


@pytest.mark.gpu
def test_cuda_fp16_engines(tiny_profile: ProfileFactory) -> None:
    engine = DiffusionEngine("tiny-sd", tiny_profile("tiny-sd", device="cuda"))
    assert engine.dtype == torch.float16
    assert engine.pipe.unet.conv_in.weight.is_contiguous()  # NCHW: channels-last measured slower on CUDA
    first, again = (engine.run([gen(seed=5, width=100, height=70)])[0].image for _ in range(2))
    # cuDNN may pick kernels that round differently between calls: compare with the batch tolerance.
    assert first.size == (100, 70) and np.abs(pixels(first) - pixels(again)).max() <= BATCH_TOLERANCE
    structure = ControlNetInpaintEngine("cn", tiny_profile("tiny-sd-controlnet", device="cuda"))
    mask = box_mask((640, 480), (1, 1, 50, 50))
    result = structure.run([inpaint("structure", image=photo(640, 480), mask=mask)])
    assert result[0].image.size == (640, 480)
    engine.close()
    structure.close()
