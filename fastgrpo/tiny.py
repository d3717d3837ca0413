"""Tiny randomly initialised models in the real on-disk formats.

`build_tiny_pipeline(dir)` writes a diffusers Stable Diffusion directory (UNet, VAE, CLIP text encoder, tokenizer,
scheduler), `build_sd14_pipeline(dir)` the same at Stable Diffusion v1.4's size, and `build_tiny_clip(dir)` an
open_clip model-config JSON plus checkpoint, so the trainer's real `from_pretrained` / open_clip loading code runs
without any download. The tokenizer is CLIP's own BPE (the vocabulary file that open_clip ships), truncated to its
first merges in the tiny models to keep the embedding table small.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import torch

TINY_MERGES = 2000


def _write_clip_tokenizer(directory: Path, num_merges: int = TINY_MERGES) -> int:
    """vocab.json + merges.txt for a CLIPTokenizer from open_clip's BPE file; returns the vocabulary size."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + num_merges]]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
    vocab += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")
    return len(vocab)


def build_tiny_pipeline(directory: str | os.PathLike, *, seed: int = 0, sample_size: int = 8,
                        prediction_type: str = "epsilon") -> Path:
    """Save a tiny random Stable Diffusion v1.x-layout pipeline (latents 4 x sample_size^2, images 2x larger)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2)
    return _save_pipeline(Path(directory), unet, vae, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4), TINY_MERGES, prediction_type)


def build_sd14_pipeline(directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save a pipeline with Stable Diffusion v1.4's architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder
    123M, the full CLIP BPE vocabulary) and random weights: real shapes and costs, no download. About 4.3 GB."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    unet = sd14_unet()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=512)
    return _save_pipeline(Path(directory), unet, vae, dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                           num_attention_heads=12, hidden_act="quick_gelu",
                                                           projection_dim=768), SD_MERGES, "epsilon")


def sd14_unet():
    """A UNet2DConditionModel with Stable Diffusion v1.4's configuration (859.5M parameters), randomly initialised.
    Needs only diffusers (the device check builds it on a GPU image that has nothing else)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        norm_num_groups=32)


SD_MERGES = 48894  # CLIP's full vocabulary: 512 byte tokens + 48894 merges + 2 special tokens = 49408


def _save_pipeline(directory: Path, unet, vae, text_config: dict, num_merges: int, prediction_type: str) -> Path:
    """Write unet and vae with a CLIP text encoder (text_config) and tokenizer as a diffusers SD directory."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = directory / "tokenizer"
    vocab_size = _write_clip_tokenizer(tokenizer_dir, num_merges)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, **text_config))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory)
    return directory


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_clip(directory: str | os.PathLike, *, seed: int = 0, wrap_state_dict: bool = True) -> tuple[Path, Path]:
    """Save a tiny random open_clip model: (config JSON path, checkpoint path). The checkpoint holds
    {'state_dict': ...} as HPSv2 ships it, or a bare state_dict when wrap_state_dict is False."""
    from open_clip.model import CLIP

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_CONFIG)
    config_path = directory / "tiny-clip.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2), encoding="utf-8")
    checkpoint_path = directory / "tiny-clip.pt"
    state = model.state_dict()
    torch.save({"state_dict": state} if wrap_state_dict else state, checkpoint_path)
    return config_path, checkpoint_path


def tiny_random_dir() -> Path:
    """Where the 'builtin:tiny-random' models live: $FASTGRPO_CACHE or ~/.cache/fastgrpo, built on first use."""
    root = Path(os.environ.get("FASTGRPO_CACHE", Path.home() / ".cache" / "fastgrpo"))
    target = root / "tiny-random-v1"
    if not (target / "complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="tiny-random-", dir=root))
        build_tiny_pipeline(staging / "pipeline")
        build_tiny_clip(staging / "clip")
        (staging / "complete").write_text("ok\n")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first
            import shutil
            shutil.rmtree(staging, ignore_errors=True)
    return target
