"""The CLIP steering reward of SafeDiffusion-R1.

    v_safe = normalize(mean(z_text(safe anchors)) - mean(z_text(unsafe anchors)))
    target = normalize(z_text(prompt) + alpha * v_safe)               (translation)
           = normalize(z - (z . v_safe) v_safe + alpha * v_safe)      (projection: replace the v_safe component)
    reward = cos(z_image, target)

alpha = 0 (translation) is plain image-text alignment. Images are scored as device tensors, batched, with tensor
preprocessing (resize, centre crop, normalise): no PIL, no files. Anchor and prompt embeddings are cached.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from fastgrpo import builtin
from fastgrpo.errors import ModelLoadError


def safety_direction(z_safe: torch.Tensor, z_unsafe: torch.Tensor) -> torch.Tensor:
    """v_safe (D,) from unit-norm anchor embeddings z_safe (A, D) and z_unsafe (A', D)."""
    return F.normalize(z_safe.mean(dim=0) - z_unsafe.mean(dim=0), dim=0)


def steering_target(z_text: torch.Tensor, v_safe: torch.Tensor, alpha: float, mode: str) -> torch.Tensor:
    """Unit-norm steered text targets (P, D) from unit-norm prompt embeddings z_text (P, D)."""
    if mode == "translation":
        return F.normalize(z_text + alpha * v_safe, dim=-1)
    component = z_text @ v_safe                                            # (P,)
    if mode == "projection":
        return F.normalize(z_text + (alpha - component).unsqueeze(-1) * v_safe, dim=-1)
    if mode == "floor":  # prompts already at least alpha along v_safe keep their own target
        return F.normalize(z_text + (alpha - component).clamp(min=0).unsqueeze(-1) * v_safe, dim=-1)
    raise ValueError(f"mode must be 'translation', 'projection' or 'floor', got {mode!r}")


def preprocess_images(images: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> CLIP input: bicubic resize of the short side, centre crop to `size`, normalise."""
    height, width = images.shape[-2:]
    scale = max(size[0] / height, size[1] / width)
    resized = (round(height * scale), round(width * scale))
    if resized != (height, width):
        images = F.interpolate(images, size=resized, mode="bicubic", align_corners=False, antialias=True)
    top, left = (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2
    images = images[..., top:top + size[0], left:left + size[1]].clamp(0, 1)
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def read_state_dict(checkpoint: str, setting: str = "reward.clip_checkpoint") -> dict:
    """A tensor state_dict from .safetensors or a torch file read with weights_only (no code runs); one-line
    ModelLoadError naming `setting` otherwise."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{setting}: {checkpoint!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelLoadError(f"{setting}: cannot read {checkpoint!r}: {type(error).__name__}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{setting}: {checkpoint!r} holds no state_dict")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_open_clip(clip_model: str, checkpoint: str | None, device: torch.device, *,
                   settings: tuple[str, str] = ("reward.clip_model", "reward.clip_checkpoint")):
    """(model, tokenizer) from an open_clip architecture name or a model-config JSON, plus a checkpoint path;
    errors name `settings` (the option that gave the architecture, the one that gave the checkpoint)."""
    import open_clip

    model_setting, checkpoint_setting = settings

    name = clip_model
    if clip_model.endswith(".json"):
        path = Path(clip_model).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"{model_setting}: config {clip_model!r} does not exist")
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ModelLoadError(f"{model_setting}: {clip_model!r} is not a JSON model config") from None
        open_clip.add_model_config(path)
        name = path.stem
    elif clip_model not in open_clip.list_models():
        raise ModelLoadError(f"{model_setting}: unknown open_clip architecture {clip_model!r} "
                             f"(give a name from open_clip.list_models() or a model-config JSON path)")
    if checkpoint is None:
        raise ModelLoadError(f"{checkpoint_setting} is required (no weights can be downloaded)")
    state = read_state_dict(checkpoint, checkpoint_setting)
    with _quiet_root_logger():
        model = open_clip.create_model(name, pretrained=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{checkpoint_setting}: {checkpoint!r} does not match {clip_model!r} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. "
                             f"{(missing + unexpected)[0]})")
    model.requires_grad_(False).eval().to(device)
    return model, open_clip.get_tokenizer(name)


def clip_image_geometry(model) -> tuple[tuple[int, int], tuple, tuple]:
    """(input size, mean, std) of an open_clip model's image tower (OpenAI CLIP's statistics when it has none)."""
    visual = model.visual
    size = tuple(visual.image_size) if isinstance(visual.image_size, (tuple, list)) \
        else (visual.image_size, visual.image_size)
    mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
    std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
    return size, mean, std


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Unit-norm fp32 image embeddings (B, D) of an open_clip model for images (B, 3, H, W) in [0, 1], in chunks."""
    size, mean, std = clip_image_geometry(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = preprocess_images(images[start:start + batch_size].to(device, torch.float32), size, mean, std)
        chunks.append(F.normalize(model.encode_image(batch.to(dtype)).float(), dim=-1))
    return torch.cat(chunks)


class SteeringReward:
    """Frozen open_clip model scoring images against safety-steered prompt embeddings."""

    def __init__(self, model, tokenizer, *, alpha: float, mode: str, safe_anchors: list[str],
                 unsafe_anchors: list[str], batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.alpha, self.mode, self.batch_size = alpha, mode, batch_size
        self.device = next(model.parameters()).device
        self._text_cache: dict[str, torch.Tensor] = {}
        if safe_anchors and unsafe_anchors:
            self.v_safe = safety_direction(self.text_embeddings(safe_anchors), self.text_embeddings(unsafe_anchors))
        else:
            self.v_safe = torch.zeros(self.text_embeddings(["a photo"]).shape[-1], device=self.device)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (len(texts), D), fp32, cached per text.

        Each text is encoded on its own: a batched matmul may round differently with the batch's size and
        composition, and which texts are new depends on what the cache already holds (after a resume, everything),
        so batching would make a resumed run's rewards differ from the uninterrupted run's in the last bits."""
        for text in dict.fromkeys(texts):
            if text not in self._text_cache:
                tokens = self.tokenizer([text]).to(self.device)
                self._text_cache[text] = F.normalize(self.model.encode_text(tokens).float(), dim=-1)[0]
        return torch.stack([self._text_cache[t] for t in texts])

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, D), fp32, from images (B, 3, H, W) in [0, 1]."""
        return embed_images(self.model, images, self.batch_size)

    def targets(self, prompts: list[str]) -> torch.Tensor:
        """Steered unit-norm targets (P, D) for the prompts."""
        return steering_target(self.text_embeddings(prompts), self.v_safe, self.alpha, self.mode)

    def __call__(self, images: torch.Tensor, prompts: list[str], prompt_index: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) for images (B, 3, H, W) whose prompts are prompts[prompt_index]."""
        targets = self.targets(prompts)[prompt_index.to(self.device)]    # (B, D)
        return (self.image_embeddings(images) * targets).sum(dim=-1)


def load_steering_reward(config, device: torch.device, dtype: torch.dtype = torch.float32) -> SteeringReward:
    """SteeringReward from a RewardConfig ('builtin:tiny-random' = the tiny random open_clip model,
    'builtin:<toy world>' = a packaged toy world's CLIP)."""
    return load_clip_reward(config, device, dtype)


def load_clip_reward(config, device: torch.device, dtype: torch.dtype = torch.float32, **settings) -> SteeringReward:
    """The RewardConfig's CLIP model as a SteeringReward; `settings` replace the config's alpha, mode, anchors."""
    clip_model, checkpoint = config.clip_model, config.clip_checkpoint
    if clip_model.startswith(builtin.PREFIX):
        if not builtin.is_builtin_model(clip_model):
            raise ModelLoadError(f"reward.clip_model: {builtin.unknown_builtin(clip_model)}")
        packaged_config, packaged_weights = builtin.clip_files(clip_model)
        clip_model, checkpoint = str(packaged_config), checkpoint or str(packaged_weights)
    model, tokenizer = load_open_clip(clip_model, checkpoint, device)
    model.to(dtype)
    chosen = {"alpha": config.alpha, "mode": config.mode, "safe_anchors": config.safe_anchors,
              "unsafe_anchors": config.unsafe_anchors, "batch_size": config.batch_size, **settings}
    return SteeringReward(model, tokenizer, **chosen)
