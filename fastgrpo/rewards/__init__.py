"""Reward models, chosen by `reward.kind`.

A reward is one module in this package; its file name is its kind. It defines

    DESCRIPTION: str                                   one line for `fastgrpo config` and the docs
    load(config: RewardConfig, device, dtype) -> Reward

and a `Reward` is any callable `reward(images, prompts, prompt_index) -> (B,) float tensor` for images (B, 3, H, W)
in [0, 1] on the device, whose prompts are prompts[prompt_index]. Options the trainer does not know go in
`reward.options` (a mapping the module reads and checks itself). The registry lists the package's files, so
naming the kinds imports nothing; a kind's module is imported when it is loaded. A directory appended to
`fastgrpo.rewards.__path__` adds its modules as kinds.

    steering    the SafeDiffusion-R1 CLIP steering reward (fastgrpo.reward)
    aesthetic   a linear head on normalised CLIP image embeddings, from a local checkpoint
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import torch

from fastgrpo.errors import ConfigError

class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str], prompt_index: torch.Tensor) -> torch.Tensor: ...


def kinds() -> list[str]:
    """The reward kinds: one per module of this package (every directory on its __path__)."""
    return sorted({p.stem for directory in __path__ for p in Path(directory).glob("*.py") if not p.stem.startswith("_")})


def load_reward(config, device: torch.device, dtype: torch.dtype = torch.float32) -> Reward:
    """The reward `config.kind` names, loaded from a RewardConfig."""
    if config.kind not in kinds():
        raise ConfigError(f"reward.kind: unknown kind {config.kind!r} (known: {', '.join(kinds())})")
    module = importlib.import_module(f"{__name__}.{config.kind}")
    return module.load(config, device, dtype)


def option(config, name: str, kind=str, default=None, *, required: bool = False):
    """reward.options[name] converted to `kind`; ConfigError (one line) when missing but required, or unconvertible."""
    if name not in config.options:
        if required:
            raise ConfigError(f"reward.options.{name} is required for reward.kind={config.kind}")
        return default
    try:
        return kind(config.options[name])
    except (TypeError, ValueError):
        raise ConfigError(f"reward.options.{name}: expected {kind.__name__}, got {config.options[name]!r}") from None
