"""`make bench-gpu` (`python -m bench.gpu`): the CUDA path at real size, on one GPU.

Stable Diffusion 1.5's UNet, VAE and CLIP text encoder are built from their published configs with
random weights (nothing is downloaded: the time and memory of a forward pass do not depend on the
weights' values). They run in diffusers' `StableDiffusionPipeline` the way `models.diffusion` places
them on CUDA: fp16, NCHW UNet, PyTorch SDPA attention, prompt embeddings passed in.

Figures, written to bench/gpu_results.json and printed as tables:
- precision: fp32 / fp16 / bf16 time of one UNet step (one image with guidance, batch 2) and the
  peak memory of UNet + VAE + text encoder during it;
- batch: images/s and peak memory of a whole 512x512 generation (text encoding, `--steps` guided
  steps, VAE decode, PIL images) at micro-batch 1, 4, 8 and 16, the UNet NCHW and channels-last;
- utilisation: UNet FLOPs (`torch.utils.flop_counter`) x steps x images / generation time / the
  card's dense fp16 peak, both as measured here (an 8192^3 fp16 matrix product) and as its datasheet
  gives it;
- layout and compilation: a UNet step for 1 and 8 guided images, NCHW and channels-last, eager and
  (at 8) under `torch.compile`, with the compile time.

`--tiny` runs the same code with tiny configs on a CPU in seconds (the tests use it; its figures mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging

# Casting random parts with .to(dtype) makes diffusers warn once per part; nothing here to act on.
diffusers_logging.set_verbosity_error()

RESULTS = Path(__file__).resolve().parent / "gpu_results.json"
BATCHES = (1, 4, 8, 16)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GUIDANCE = 7.5
SECTIONS = ("peak_flops", "precision", "batches", "layouts")  # in the order `run` measures them
# Dense (not 2:4 sparse) fp16 tensor-core peaks from the vendors' datasheets, in FLOP/s.
DATASHEET_FP16 = {"H200": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12,
                  "A100": 312e12, "L40S": 362.1e12, "L4": 121e12, "A10G": 125e12, "RTX 4090": 165.2e12}

# SD 1.5's published configs (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/config.json);
# the tiny ones are the same kinds of blocks, few and narrow, so a CPU runs them in milliseconds. Not
# models.tiny's: this module runs on GPU hosts with torch and diffusers alone, without the service.
SD15: dict[str, Any] = {
    "unet": {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
             "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2},
    "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "projection_dim": 768, "vocab_size": 49408},
    "size": 512,
}
TINY: dict[str, Any] = {
    "unet": {"sample_size": 8, "cross_attention_dim": 16, "attention_head_dim": 4, "block_out_channels": (8, 16),
             "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")},
    "vae": {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64},
    "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "projection_dim": 16, "vocab_size": 49408},
    "size": 64,
}


class Clock:
    """Median wall time of `repeats` calls after `warmup` calls, the device drained around each."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median(self, run: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            run()
        self.sync()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            self.sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times)


def build_pipeline(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """Text-to-image pipeline of randomly initialised parts, created on the device (no CPU init)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **config["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            **config["vae"])
        text = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **config["text"]))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    # No tokenizer: prompts arrive as embeddings, as the engine's prompt cache hands them over.
    pipe: Any = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeddings(pipe: Any, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative embeddings of `images` prompts, through the text encoder (timed with it)."""
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (2 * images, 77), device=pipe.device)
    with torch.inference_mode():
        hidden = pipe.text_encoder(ids)[0]
    return hidden[:images], hidden[images:]


def unet_inputs(pipe: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    side = pipe.unet.config.sample_size
    latents = torch.randn(batch, 4, side, side, device=pipe.device, dtype=pipe.dtype)
    text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, device=pipe.device, dtype=pipe.dtype)
    return latents, torch.tensor([500], device=pipe.device), text


def unet_step(unet: Any, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            unet(*inputs[:2], encoder_hidden_states=inputs[2])
    return run


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def unet_flops(pipe: Any, batch: int) -> int:
    """FLOPs of one UNet forward pass at `batch` latents, counted by PyTorch's operator-level counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        unet_step(pipe.unet, unet_inputs(pipe, batch))()
    return int(counter.get_total_flops())


def matmul_peak(device: torch.device, clock: Clock, n: int) -> float:
    """FLOP/s of an n^3 fp16 matrix product: the tensor-core ceiling this card reaches here."""
    a = torch.randn(n, n, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    b = torch.randn_like(a)
    seconds = clock.median(lambda: a @ b, repeats=10, warmup=3)
    return 2 * n**3 / seconds


def utilisation(flops_per_image_step: float, steps: int, images: int, seconds: float,
                peak: float | None) -> float | None:
    """Share of the peak the UNet's arithmetic uses over a whole generation (VAE and text encoder excluded)."""
    return None if not peak else flops_per_image_step * steps * images / seconds / peak


def measure_precisions(config: dict[str, Any], device: torch.device, clock: Clock,
                       repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, dtype in DTYPES.items():
        if device.type == "cpu" and dtype is torch.float16:
            continue  # half-precision convolutions are not a CPU path
        pipe = build_pipeline(config, device, dtype)
        reset_peak(device)
        seconds = clock.median(unet_step(pipe.unet, unet_inputs(pipe, 2)), repeats=repeats, warmup=3)
        rows.append({"precision": name, "unet_step_ms": seconds * 1e3, "peak_gib": peak_gib(device)})
        del pipe
    return rows


LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def measure_batches(config: dict[str, Any], device: torch.device, clock: Clock, dtype: torch.dtype,
                    batches: tuple[int, ...], steps: int, repeats: int,
                    peaks: dict[str, float | None]) -> list[dict[str, Any]]:
    """Whole generations at each micro-batch size, the UNet in each memory layout."""
    pipe = build_pipeline(config, device, dtype)
    flops = unet_flops(pipe, 2)  # one image with guidance: the conditional and unconditional halves
    size = config["size"]
    rows: list[dict[str, Any]] = []
    for batch in batches:
        def generate(batch: int = batch) -> None:
            embeds, negative = prompt_embeddings(pipe, batch)
            with torch.inference_mode():
                images = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps,
                              guidance_scale=GUIDANCE, height=size, width=size, output_type="pil").images
            assert len(images) == batch and images[0].size == (size, size)

        for layout, memory_format in LAYOUTS.items():
            pipe.unet.to(memory_format=memory_format)
            reset_peak(device)
            seconds = clock.median(generate, repeats=repeats)
            rows.append({"batch": batch, "layout": layout, "seconds": seconds, "images_per_s": batch / seconds,
                         "peak_gib": peak_gib(device), "unet_flops_per_image_step": flops,
                         "utilisation_vs_measured": utilisation(flops, steps, batch, seconds, peaks["measured"]),
                         "utilisation_vs_datasheet": utilisation(flops, steps, batch, seconds, peaks["datasheet"])})
    latents = torch.randn(8, 4, size // 8, size // 8, device=device, dtype=dtype)

    def decode() -> None:
        with torch.inference_mode():
            pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    vae_seconds = clock.median(decode, repeats=repeats)
    for row in rows:
        if row["batch"] == 8:
            row["vae_decode_share"] = vae_seconds / row["seconds"]
    return rows


def measure_layouts(config: dict[str, Any], device: torch.device, clock: Clock, dtype: torch.dtype, repeats: int,
                    compile_unet: bool) -> list[dict[str, Any]]:
    """One UNet step for 1 and 8 guided images in each layout, eager; compiled at 8 images."""
    pipe = build_pipeline(config, device, dtype)
    rows: list[dict[str, Any]] = []
    for images in (1, 8):
        inputs = unet_inputs(pipe, 2 * images)
        for layout, memory_format in LAYOUTS.items():
            pipe.unet.to(memory_format=memory_format)
            rows.append({"images": images, "layout": layout, "mode": "eager",
                         "unet_step_ms": clock.median(unet_step(pipe.unet, inputs), repeats, 3) * 1e3})
            if compile_unet and images == 8:
                compiled = torch.compile(pipe.unet)
                started = time.perf_counter()
                unet_step(compiled, inputs)()
                clock.sync()
                compile_s = time.perf_counter() - started
                rows.append({"images": images, "layout": layout, "mode": "torch.compile", "compile_s": compile_s,
                             "unet_step_ms": clock.median(unet_step(compiled, inputs), repeats, 3) * 1e3})
                torch._dynamo.reset()  # the next layout compiles afresh rather than guarding on this one
    return rows


def card(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def datasheet_peak(gpu: str | None) -> float | None:
    return next((flops for name, flops in DATASHEET_FP16.items() if gpu and name in gpu), None)


def run(tiny: bool = False, steps: int = 30, batches: tuple[int, ...] = BATCHES, repeats: int = 3,
        compile_unet: bool = True, save: Callable[[dict[str, Any]], None] = lambda results: None) -> dict[str, Any]:
    """Every section's figures; `save` gets the results after each one, so a run stopped midway keeps them."""
    config = TINY if tiny else SD15
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    clock = Clock(device)
    # Off: the pipelines never train, and autograd's bookkeeping would distort time and memory.
    torch.set_grad_enabled(False)
    info = card(device)
    results: dict[str, Any] = {"card": info, "model": "tiny" if tiny else "SD 1.5 (random weights)",
                               "size": config["size"], "steps": steps, "guidance_scale": GUIDANCE}
    peaks = {"measured": matmul_peak(device, clock, 512 if tiny else 8192),
             "datasheet": datasheet_peak(info.get("gpu"))}
    results["peak_flops"] = peaks
    save(results)
    results["precision"] = measure_precisions(config, device, clock, repeats=2 if tiny else 10)
    save(results)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    results["batches"] = measure_batches(config, device, clock, dtype, batches, steps, repeats, peaks)
    save(results)
    results["layouts"] = measure_layouts(config, device, clock, dtype, repeats=2 if tiny else 10,
                                         compile_unet=compile_unet)
    save(results)
    return results


def print_tables(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(results["card"])
    console.print(f"peak fp16 FLOP/s: measured {results['peak_flops']['measured'] / 1e12:.0f} T, datasheet "
                  f"{(results['peak_flops']['datasheet'] or 0) / 1e12:.0f} T")
    table = Table(title="UNet step, one image with guidance (batch 2)")
    for column in ("precision", "ms", "peak GiB"):
        table.add_column(column)
    for row in results["precision"]:
        table.add_row(row["precision"], f"{row['unet_step_ms']:.1f}", f"{row['peak_gib'] or 0:.2f}")
    console.print(table)
    table = Table(title=f"Whole generation, {results['size']} px, {results['steps']} steps, "
                        f"guidance {results['guidance_scale']}")
    for column in ("batch", "UNet layout", "s", "images/s", "peak GiB", "utilisation (measured peak)",
                   "utilisation (datasheet)"):
        table.add_column(column)
    for row in results["batches"]:
        table.add_row(str(row["batch"]), row["layout"], f"{row['seconds']:.2f}", f"{row['images_per_s']:.2f}",
                      f"{row['peak_gib'] or 0:.2f}", f"{row['utilisation_vs_measured'] or 0:.1%}",
                      f"{row['utilisation_vs_datasheet'] or 0:.1%}")
    console.print(table)
    table = Table(title="UNet step, guided images (2 latents each)")
    for column in ("images", "layout", "mode", "ms", "compile s"):
        table.add_column(column)
    for row in results["layouts"]:
        table.add_row(str(row["images"]), row["layout"], row["mode"], f"{row['unet_step_ms']:.1f}",
                      f"{row.get('compile_s', 0):.0f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny configs on the CPU (a smoke run; figures mean nothing)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per generation (default: 30, the API's)")
    parser.add_argument("--no-compile", dest="compile_unet", action="store_false", help="skip torch.compile")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default: {RESULTS.name})")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: this benchmark measures the GPU path (--tiny runs it on a CPU)")

    def save(results: dict[str, Any]) -> None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        done = [section for section in SECTIONS if section in results]
        print(f"{len(done)} of {len(SECTIONS)} sections measured, written to {args.out}", flush=True)

    results = run(tiny=args.tiny, steps=args.steps, compile_unet=args.compile_unet, save=save)
    print_tables(results)


if __name__ == "__main__":
    main()
