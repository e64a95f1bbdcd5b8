"""The quality harness behind `step1x eval`: fill and 4x upscaling, measured on shipped photos.

Photos are the ones that ship inside installed wheels (scikit-image, scikit-learn), centre-cropped
to a square and resized to 512x512 with Lanczos; nothing is downloaded.

- fill: centre squares covering 5% and 15% of the image and seeded free-form strokes near 15%;
  PSNR and SSIM over the whole image and inside the mask only (whole-image figures are dominated by
  the pixels the mask did not touch), per method and for the engine's own choice.
- 4x: HR is the 512 px photo, LR its 128 px PIL bicubic (antialiased) downscale; PSNR and SSIM on
  RGB and on BT.601 luma Y (0-255 scale, no border cropped), for bicubic and every upscale profile
  whose weights are present.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from skimage import color, data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.datasets import load_sample_image

from core.settings import ModelProfile, Settings
from models.classical import FILL_METHODS, ClassicalFillEngine, LanczosUpscaleEngine, choose_method, inpaint
from models.engine import Engine, ImageRequest
from models.esrgan import EsrganEngine
from models.waifu2x import Waifu2xEngine

SIZE, SCALE = 512, 4
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": data.astronaut,
    "coffee": data.coffee,
    "chelsea": data.chelsea,
    "rocket": data.rocket,
    "camera": lambda: color.gray2rgb(data.camera()),
    "immunohistochemistry": data.immunohistochemistry,
    "motorcycle": lambda: data.stereo_motorcycle()[0],
    "china": lambda: load_sample_image("china.jpg"),
    "flower": lambda: load_sample_image("flower.jpg"),
}
UPSCALERS: dict[str, type[Engine]] = {"esrgan": EsrganEngine, "waifu2x": Waifu2xEngine,
                                      "lanczos": LanczosUpscaleEngine}
FILL_TARGET_DB, UPSCALE_GAIN_DB, MIN_PHOTOS = 28.3, 1.5, 6


def photo(name: str) -> Image.Image:
    image = Image.fromarray(PHOTOS[name]()).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def centre_square(coverage: float) -> np.ndarray:
    side = round(SIZE * coverage ** 0.5)
    mask = np.zeros((SIZE, SIZE), bool)
    start = (SIZE - side) // 2
    mask[start:start + side, start:start + side] = True
    return mask


def strokes(coverage: float, seed: int = 0) -> np.ndarray:
    """Free-form brush strokes (random walks 8-16 px wide) until `coverage` is reached."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((SIZE, SIZE), np.uint8)
    while np.count_nonzero(canvas) < coverage * SIZE * SIZE:
        point, width = rng.uniform(40, SIZE - 40, 2), int(rng.integers(8, 17))
        for _ in range(6):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(20, 60)
            after = np.clip(point + length * np.array([np.cos(angle), np.sin(angle)]), 0, SIZE - 1)
            cv2.line(canvas, (int(point[0]), int(point[1])), (int(after[0]), int(after[1])), 255, width)
            point = after
    return canvas > 0


MASKS: dict[str, Callable[[], np.ndarray]] = {
    "centre 5%": lambda: centre_square(0.05),
    "centre 15%": lambda: centre_square(0.15),
    "strokes 15%": lambda: strokes(0.15),
}


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 Y on the 16-235 scale, as super-resolution papers report it."""
    return 16 + rgb.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255


def fill_scores(truth: np.ndarray, out: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    ssim, ssim_map = structural_similarity(truth, out, channel_axis=-1, data_range=255, full=True)
    return {"psnr": peak_signal_noise_ratio(truth, out, data_range=255), "ssim": float(ssim),
            "psnr_mask": peak_signal_noise_ratio(truth[mask], out[mask], data_range=255),
            "ssim_mask": float(ssim_map[mask].mean())}


def upscale_scores(truth: np.ndarray, out: np.ndarray) -> dict[str, float]:
    y_truth, y_out = luma(truth), luma(out)
    return {"psnr": peak_signal_noise_ratio(truth, out, data_range=255),
            "ssim": float(structural_similarity(truth, out, channel_axis=-1, data_range=255)),
            "psnr_y": peak_signal_noise_ratio(y_truth, y_out, data_range=255),
            "ssim_y": float(structural_similarity(y_truth, y_out, data_range=255))}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def _upscalers(models_dir: Path) -> tuple[dict[str, Engine], dict[str, str]]:
    engines: dict[str, Engine] = {}
    skipped = {}
    for name, profile in Settings(models_dir=models_dir).models.items():
        if profile.task != "upscale" or profile.engine not in UPSCALERS:
            continue
        if profile.weights and not Path(profile.weights).is_file():
            skipped[name] = f"no weights at {profile.weights}: run `step1x models pull {name}`"
            continue
        engines[name] = UPSCALERS[profile.engine](name, profile)
    return engines, skipped


def _fill_runs(engine: ClassicalFillEngine, hr: Image.Image, mask: np.ndarray
               ) -> dict[str, Callable[[], np.ndarray]]:
    """Each fill method on its own over the whole image, and the engine as a job would run it."""
    truth = np.asarray(hr)
    runs: dict[str, Callable[[], np.ndarray]] = {m: partial(inpaint, truth, mask, m) for m in FILL_METHODS}
    runs["auto"] = lambda: np.asarray(engine.fill(hr, Image.fromarray(mask)))
    return runs


def run_eval(models_dir: Path, out_json: Path, photos: int | None = None,
             console: Console | None = None) -> dict:
    """Measure fill and 4x upscaling on the first `photos` eval photos (all by default), write the
    report as JSON to `out_json` and return it."""
    names = list(PHOTOS)[:photos]
    masks = {kind: make() for kind, make in MASKS.items()}
    upscalers, skipped = _upscalers(models_dir)
    fill_engine = ClassicalFillEngine("classical-fill", ModelProfile(task="inpaint", engine="classical"))
    fill: dict[str, dict[str, list[dict[str, float]]]] = {k: {m: [] for m in (*FILL_METHODS, "auto")}
                                                          for k in masks}
    upscale: dict[str, list[dict[str, float]]] = {m: [] for m in ("bicubic", *upscalers)}
    steps = len(names) * (len(masks) * (len(FILL_METHODS) + 1) + len(upscale))
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task("eval", total=steps)
        for name in names:
            hr = photo(name)
            truth = np.asarray(hr)
            for kind, mask in masks.items():
                for method, fill_one in _fill_runs(fill_engine, hr, mask).items():
                    progress.update(task, description=f"{name}: fill {kind} {method}")
                    started = time.perf_counter()
                    out = fill_one()
                    scores = fill_scores(truth, out, mask) | {"seconds": time.perf_counter() - started}
                    fill[kind][method].append(scores)
                    progress.advance(task)
            lr = hr.resize((SIZE // SCALE, SIZE // SCALE), Image.Resampling.BICUBIC)
            for method in upscale:
                progress.update(task, description=f"{name}: 4x {method}")
                started = time.perf_counter()
                if method == "bicubic":
                    out = np.asarray(lr.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
                else:
                    out = np.asarray(upscalers[method].run([ImageRequest(kind="upscale", image=lr)])[0].image)
                seconds = time.perf_counter() - started
                upscale[method].append(upscale_scores(truth, out) | {"seconds": seconds})
                progress.advance(task)
    report = {
        "photos": names,
        "size": SIZE,
        "fill": {kind: {"coverage": float(mask.mean()), "auto_method": choose_method(mask),
                        "methods": {m: _mean(rows) for m, rows in fill[kind].items()},
                        "per_photo": {m: dict(zip(names, r, strict=True)) for m, r in fill[kind].items()}}
                 for kind, mask in masks.items()},
        "upscale": {"downscale": f"PIL bicubic (antialiased) {SIZE}->{SIZE // SCALE}", "skipped": skipped,
                    "methods": {m: _mean(rows) for m, rows in upscale.items()},
                    "per_photo": {m: dict(zip(names, rows, strict=True)) for m, rows in upscale.items()}},
    }
    report["targets"] = _targets(report)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2))
    return report


def _targets(report: dict) -> dict[str, dict[str, object]]:
    enough = len(report["photos"]) >= MIN_PHOTOS
    fill_db = report["fill"]["centre 5%"]["methods"]["auto"]["psnr"]
    targets: dict[str, dict[str, object]] = {
        "fill centre 5% whole-image PSNR": {"value": fill_db, "target": FILL_TARGET_DB,
                                            "met": enough and fill_db >= FILL_TARGET_DB}}
    methods = report["upscale"]["methods"]
    if "waifu2x-x4" in methods:
        gain = methods["waifu2x-x4"]["psnr"] - methods["bicubic"]["psnr"]
        targets["waifu2x-x4 PSNR gain over bicubic"] = {"value": gain, "target": UPSCALE_GAIN_DB,
                                                        "met": enough and gain >= UPSCALE_GAIN_DB}
    return targets


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    fill = Table(title=f"fill at {report['size']} px, mean of {len(report['photos'])} photos")
    for column in ("mask", "coverage", "method", "PSNR", "SSIM", "PSNR in mask", "SSIM in mask", "s/image"):
        fill.add_column(column, justify="left" if column in ("mask", "method") else "right")
    for kind, section in report["fill"].items():
        for method, m in section["methods"].items():
            label = f"auto ({section['auto_method']})" if method == "auto" else method
            fill.add_row(kind, f"{section['coverage']:.1%}", label, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}",
                         f"{m['psnr_mask']:.2f}", f"{m['ssim_mask']:.4f}", f"{m['seconds']:.3f}")
        fill.add_section()
    console.print(fill)
    up = report["upscale"]
    table = Table(title=f"4x upscaling to {report['size']} px; LR: {up['downscale']}")
    for column in ("method", "PSNR RGB", "SSIM RGB", "PSNR Y", "SSIM Y", "s/image"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, m in up["methods"].items():
        table.add_row(method, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['psnr_y']:.2f}",
                      f"{m['ssim_y']:.4f}", f"{m['seconds']:.3f}")
    console.print(table)
    for name, reason in up["skipped"].items():
        console.print(f"[yellow]skipped {name}[/]: {reason}")
    for name, target in report["targets"].items():
        mark = "[green]met[/]" if target["met"] else "[red]not met[/]"
        console.print(f"{name}: {target['value']:.2f} (target {target['target']}) {mark}")
