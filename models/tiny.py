"""Tiny randomly initialised Stable Diffusion pipelines, built offline, so everything runs on a fresh
CPU machine with no weights to fetch.

Each part is a real diffusers directory (`save_pretrained` layout, loaded back with `from_pretrained`),
~0.5 MB, native 64 px. The weights are random: the images are noise. They prove the pipeline plumbing
(shapes, seeds, batching, crops), never image quality.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

SEED = 0
NATIVE_SIZE = 64
PARTS = ("text2img", "inpaint", "controlnet")

# The UNet and the ControlNet share this down path; only in_channels differ (9 vs 4).
_BLOCKS: dict[str, Any] = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Saving shows a progress bar per part; a build is a fraction of a second and needs none.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte, so any UTF-8 prompt tokenizes without unknowns."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def _write_tokenizer(folder: Path) -> CLIPTokenizer:
    # CLIP's vocabulary order: bytes, bytes ending a word, (merges: none here), then the two specials.
    chars = _byte_alphabet()
    tokens = [*chars, *(c + "</w>" for c in chars), BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # Without model_max_length the pipelines pad prompts to a huge default and the text encoder fails.
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
              "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder)


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    # CLIP pools the hidden state at the first eos token: the ids must agree with the tokenizer's.
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_BLOCKS["cross_attention_dim"], intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=16,
    ))


def _vae() -> AutoencoderKL:
    # Four blocks give SD's 8x latent downscale, so image sizes follow the real rules (multiples of 8).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=NATIVE_SIZE,
    )


def _unet(in_channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=NATIVE_SIZE // 8, in_channels=in_channels, out_channels=4,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **_BLOCKS,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _pipeline(cls: type[StableDiffusionPipeline] | type[StableDiffusionInpaintPipeline], in_channels: int,
              work: Path) -> Any:
    # Written where save_pretrained puts the tokenizer, so the hand-made vocab.json and merges.txt ship
    # beside the tokenizer.json it adds (older transformers read the former).
    tokenizer = _write_tokenizer(work / "tokenizer")
    return cls(vae=_vae(), text_encoder=_text_encoder(tokenizer), tokenizer=tokenizer,
               unet=_unet(in_channels), scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)


def _controlnet(_: Path) -> ControlNetModel:
    # Mirrors the inpaint UNet's down path, but sees the 4 noisy latent channels only: the inpaint
    # pipeline adds mask and masked image after the ControlNet, for the UNet alone.
    net: Any = ControlNetModel(in_channels=4, conditioning_embedding_out_channels=(4, 8, 8, 16), **_BLOCKS)
    # A ControlNet starts with zeroed output convolutions, so a fresh one changes nothing; random ones
    # make the edge map visibly steer the noise, which lets tests prove it is wired in.
    zeroed = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    for conv in zeroed:
        torch.nn.init.normal_(conv.weight, std=0.5)
    return net


_BUILDERS: dict[str, Callable[[Path], Any]] = {
    "text2img": lambda work: _pipeline(StableDiffusionPipeline, 4, work),
    "inpaint": lambda work: _pipeline(StableDiffusionInpaintPipeline, 9, work),
    "controlnet": _controlnet,
}


def _complete(folder: Path) -> bool:
    # Parts only appear by rename once fully written, so their index file marks a finished build.
    return (folder / "model_index.json").is_file() or (folder / "config.json").is_file()


def build_tiny(root: Path) -> Path:
    """Build each missing part under root (text2img, inpaint, controlnet); return root.

    Reproducible (fixed seed, caller's RNG untouched) and safe to interrupt or race: each part is
    written to a temporary folder beside its target and renamed into place when complete.
    """
    root.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        target = root / part
        if _complete(target):
            continue
        work = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=root))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                _BUILDERS[part](work).save_pretrained(work)
            work.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
            if target.exists() and not _complete(target):  # a leftover not made by this function
                shutil.rmtree(target, ignore_errors=True)
            try:
                work.rename(target)
            except OSError:
                if not _complete(target):  # another process won the race only if its part is whole
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


def ensure_tiny(root: Path) -> Path:
    """The tiny pipelines' root, built first if any part is missing."""
    if all(_complete(root / part) for part in PARTS):
        return root
    return build_tiny(root)
