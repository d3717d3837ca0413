"""Loading a diffusers-format Stable Diffusion v1.x model: trainable UNet, frozen VAE and text encoder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgrpo import builtin
from fastgrpo.errors import ModelLoadError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class DiffusionModels:
    unet: torch.nn.Module           # trained
    vae: torch.nn.Module            # frozen
    text_encoder: torch.nn.Module   # frozen
    tokenizer: object
    scheduler: object               # a DDIMScheduler built from the model's scheduler config
    source: str                     # the resolved directory or hub id

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int | None) -> tuple[int, int, int]:
        """(C, H, W) of the latents for an image `resolution` pixels square (None: the UNet's native size)."""
        size = self.unet.config.sample_size if resolution is None else resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, size, size)


def resolve_pretrained(pretrained: str) -> str:
    """'builtin:tiny-random' -> the cached tiny random pipeline, 'builtin:<toy world>' (toyworld, toyworld-spots,
    ...) -> a packaged toy world's model; a path is checked; other strings are hub ids."""
    if pretrained.startswith(builtin.PREFIX):
        if not builtin.is_builtin_model(pretrained):
            raise ModelLoadError(f"model.pretrained: {builtin.unknown_builtin(pretrained)}")
        return str(builtin.pipeline_dir(pretrained))
    path = Path(pretrained).expanduser()
    looks_like_path = path.is_absolute() or pretrained.startswith((".", "~")) or path.exists() \
        or pretrained.count("/") != 1
    if not looks_like_path:
        return pretrained
    if not path.exists():
        raise ModelLoadError(f"model.pretrained: {pretrained!r} does not exist")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"model.pretrained: {pretrained!r} is not a diffusers pipeline directory "
                             f"(no model_index.json)")
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelLoadError(f"model.pretrained: {path / 'model_index.json'} is not valid JSON "
                             f"({str(error).splitlines()[0][:120]})") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise ModelLoadError(f"model.pretrained: {path / 'model_index.json'} is not a diffusers pipeline index "
                             "(no _class_name)")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"model.pretrained: {pretrained!r} lacks the component folder(s) {', '.join(missing)}")
    return str(path)


def _quiet_hub_libraries() -> None:
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_diffusion_models(pretrained: str, *, device: torch.device, revision: str | None = None,
                          frozen_dtype: torch.dtype = torch.float32) -> DiffusionModels:
    """Load UNet (trainable, fp32), VAE and text encoder (frozen, eval, in `frozen_dtype`) and a DDIM scheduler.

    The scheduler has clip_sample and thresholding off, as diffusers' StableDiffusionPipeline sets for SD v1.x.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet_hub_libraries()
    source = resolve_pretrained(pretrained)
    kwargs = {"revision": revision} if revision else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"model.pretrained: cannot load {pretrained!r}: {first}") from None
    scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False, thresholding=False)
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    unet.requires_grad_(True).train()
    return DiffusionModels(unet.to(device), vae.to(device, frozen_dtype), text_encoder.to(device, frozen_dtype),
                           tokenizer, scheduler, source)


def select_trainable(unet: torch.nn.Module, patterns: list[str]) -> int:
    """Train only the parameters whose names contain one of `patterns` (all of them when empty); returns how many
    parameters train. ConfigError when a pattern matches nothing."""
    from fastgrpo.errors import ConfigError

    if not patterns:
        return sum(p.numel() for p in unet.parameters() if p.requires_grad)
    unmatched = [pattern for pattern in patterns if not any(pattern in name for name, _ in unet.named_parameters())]
    if unmatched:
        raise ConfigError(f"train.trainable_modules: {unmatched[0]!r} matches no UNet parameter")
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(any(pattern in name for pattern in patterns))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def xformers_unavailable(device: torch.device) -> str | None:
    """None when xformers attention runs on `device`, else why not."""
    if device.type != "cuda":
        return f"it has no kernels for {device.type} tensors"
    try:
        import xformers.ops
        q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as error:  # noqa: BLE001 - an install built for another torch fails in many ways
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'cannot run'}"
    return None


def configure_unet(unet: torch.nn.Module, *, attention: str, gradient_checkpointing: bool) -> str:
    """Attention backend and activation checkpointing; returns the attention backend in use: 'xformers', 'sdpa', or
    'fastgrpo-cpu' (`fastgrpo.attention`: the C++ kernel for the small heads, SDPA for the rest)."""
    import sys

    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if attention == "xformers":
        reason = xformers_unavailable(next(unet.parameters()).device)
        if reason is None:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        print(f"fastgrpo: xformers attention unavailable ({reason}); using PyTorch SDPA", file=sys.stderr)
    if attention == "auto":
        from fastgrpo.attention import FastgrpoAttnProcessor, uses_small_head_kernel

        if next(unet.parameters()).device.type == "cpu" and uses_small_head_kernel(unet):
            unet.set_attn_processor(FastgrpoAttnProcessor())
            return "fastgrpo-cpu"
    return "sdpa"


def note_truncated_prompts(models: DiffusionModels, prompts: list[str]) -> int:
    """Say in one line how many prompts the text encoder cuts at its token limit (77 for SD v1.x); returns that
    number."""
    import sys

    limit = min(models.tokenizer.model_max_length, models.text_encoder.config.max_position_embeddings)
    lengths = [len(ids) for ids in models.tokenizer(prompts, truncation=False).input_ids]
    long = [prompt for prompt, length in zip(prompts, lengths) if length > limit]
    if long:
        print(f"fastgrpo: note: {len(long)} of {len(prompts)} prompts are longer than the text encoder's {limit} "
              f"tokens and are truncated (e.g. {long[0][:60]!r}...)", file=sys.stderr)
    return len(long)


@torch.no_grad()
def encode_prompts(models: DiffusionModels, prompts: list[str]) -> torch.Tensor:
    """CLIP text-encoder hidden states (len(prompts), L, D) for the UNet's cross-attention, in fp32."""
    max_length = min(models.tokenizer.model_max_length, models.text_encoder.config.max_position_embeddings)
    tokens = models.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                              return_tensors="pt")
    device = next(models.text_encoder.parameters()).device
    return models.text_encoder(tokens.input_ids.to(device))[0].float()
