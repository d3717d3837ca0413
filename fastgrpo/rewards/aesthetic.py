"""An aesthetic-style score: a linear head on the unit-norm CLIP image embedding, w . z_image + b, as the LAION
aesthetic predictor's linear variant scores images (the prompt is not used).

reward.clip_model / clip_checkpoint name the CLIP model; reward.options.head is a local .safetensors (or .pt,
read with weights_only) holding `weight` (1, D) or (D,) and `bias` (1,) for the model's embedding size D.
"""

from __future__ import annotations

import torch

from fastgrpo.errors import ModelLoadError
from fastgrpo.rewards import option

DESCRIPTION = "linear head on CLIP image embeddings (aesthetic-style score); reward.options.head = its checkpoint"


class LinearHeadReward:
    def __init__(self, clip_reward, weight: torch.Tensor, bias: torch.Tensor):
        self.clip = clip_reward
        self.weight, self.bias = weight.to(clip_reward.device), bias.to(clip_reward.device)

    def __call__(self, images: torch.Tensor, prompts: list[str], prompt_index: torch.Tensor) -> torch.Tensor:
        return self.clip.image_embeddings(images) @ self.weight + self.bias


def read_head(path: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fastgrpo.reward import read_state_dict

    state = read_state_dict(path, "reward.options.head")
    if "weight" not in state or "bias" not in state:
        raise ModelLoadError(f"reward.options.head: {path!r} must hold 'weight' and 'bias' (has {sorted(state)[:4]})")
    weight, bias = state["weight"].float().reshape(-1), state["bias"].float().reshape(-1)
    if weight.shape[0] != dim or bias.shape[0] != 1:
        raise ModelLoadError(f"reward.options.head: {path!r} has weight {tuple(state['weight'].shape)} and bias "
                             f"{tuple(state['bias'].shape)}; the CLIP model's embeddings have {dim} dimensions")
    return weight, bias[0]


def load(config, device: torch.device, dtype: torch.dtype = torch.float32) -> LinearHeadReward:
    from fastgrpo.reward import load_clip_reward

    head = option(config, "head", required=True)
    clip = load_clip_reward(config, device, dtype, alpha=0.0, safe_anchors=[], unsafe_anchors=[])
    weight, bias = read_head(head, clip.v_safe.shape[0])
    return LinearHeadReward(clip, weight, bias)
