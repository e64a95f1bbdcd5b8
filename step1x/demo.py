"""`step1x demo`: a small catalog through the whole embedded stack, on photos shipped in scikit-image.

48 items: 12 text-to-image, 12 object removals (fill), 8 structure-guided and 8 prompt-guided
inpaints, 8 4x upscales. The fill and upscale outputs are real image processing on real photos;
the generate/structure/text outputs come from the tiny offline pipelines unless real weights are
configured, so they are noise by design.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console

from core.settings import Settings

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
PRODUCTS = ("a white leather sneaker", "a ceramic coffee mug", "a red backpack", "a steel water bottle",
            "a wooden desk lamp", "a pair of sunglasses")


def sample_photo(name: str, size: int) -> Image.Image:
    from skimage import data

    array = getattr(data, name)()
    image = Image.fromarray(np.asarray(array)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def demo_mask(size: int, index: int) -> Image.Image:
    """Alternating centre rectangles and free strokes: object removal and scratch repair."""
    mask = Image.new("L", (size, size))
    draw = ImageDraw.Draw(mask)
    rng = np.random.default_rng(index)
    if index % 2 == 0:
        w, h = int(size * rng.uniform(0.15, 0.3)), int(size * rng.uniform(0.15, 0.3))
        x, y = int(rng.uniform(0.2, 0.6) * size), int(rng.uniform(0.2, 0.6) * size)
        draw.rectangle((x, y, x + w, y + h), fill=255)
    else:
        points = [tuple(int(v) for v in rng.uniform(0.1, 0.9, 2) * size) for _ in range(5)]
        draw.line(points, fill=255, width=max(3, size // 40))
    return mask


def write_catalog(folder: Path) -> Path:
    """The demo manifest plus its input files; the client uploads the files it names."""
    folder.mkdir(parents=True, exist_ok=True)
    items: list[dict[str, Any]] = []
    for i in range(12):
        items.append({"custom_id": f"generate-{i:02d}", "kind": "generate", "seed": i, "steps": 4,
                      "prompt": f"studio photo of {PRODUCTS[i % len(PRODUCTS)]}, white background",
                      "width": 256, "height": 256})
    for i in range(28):
        name = PHOTOS[i % len(PHOTOS)]
        photo, mask = f"{name}.png", f"mask-{i:02d}.png"
        if not (folder / photo).exists():
            sample_photo(name, 512).save(folder / photo)
        demo_mask(512, i).save(folder / mask)
        mode = "fill" if i < 12 else "structure" if i < 20 else "text"
        item: dict[str, Any] = {"custom_id": f"{mode}-{i:02d}", "kind": "inpaint", "mode": mode,
                                "image": photo, "mask": mask, "seed": i, "steps": 4}
        if mode == "text":
            item["prompt"] = f"{PRODUCTS[i % len(PRODUCTS)]} on a table"
        items.append(item)
    for i in range(8):
        name = PHOTOS[i % len(PHOTOS)]
        small = f"{name}-128.png"
        if not (folder / small).exists():
            sample_photo(name, 128).save(folder / small)
        items.append({"custom_id": f"upscale-{i:02d}", "kind": "upscale", "image": small})
    manifest = folder / "catalog.jsonl"
    manifest.write_text("".join(json.dumps(item) + "\n" for item in items))
    return manifest


def run_demo(out: Path, data_dir: Path, port: int, console: Console) -> bool:
    from step1x.cli import print_summary, wait_with_progress
    from step1x.client import Client
    from step1x.stack import EmbeddedStack, ensure_default_weights

    ensure_default_weights(Settings(data_dir=data_dir), console)
    manifest = write_catalog(data_dir / "demo-catalog")
    with console.status("starting the embedded stack..."):
        stack = EmbeddedStack(data_dir, api_port=port, gpus="all").start()
    try:
        with Client(stack.api_url, stack.api_key) as client:
            started = time.monotonic()
            batch = client.submit_manifest(manifest, metadata={"source": "step1x demo"})
            console.print(f"submitted batch {batch['id']} ({batch['total']} items)")
            batch = wait_with_progress(client, batch)
            seconds = time.monotonic() - started
            if out.exists():
                shutil.rmtree(out)
            paths = client.download_results(batch["id"], out)
            print_summary(client, batch, seconds)
            console.print(f"{len(paths)} images in {out}/")
            return bool(batch["counts"]["succeeded"] == batch["total"])
    finally:
        with console.status("stopping the stack..."):
            stack.stop()
