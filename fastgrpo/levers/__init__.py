"""Levers: optional changes to what an update does, one file each, reaching the trainer through three hooks.

- **Advantage transforms** `(advantages (N,), is_unsafe (N,), epoch) -> advantages`, applied in order after the
  group normalisation (`fastgrpo.epoch.collect_epoch`): `safe_advantages.py` (`train.safe_advantages=zero`),
  `negative_advantages.py` (`train.negative_advantages=zero`), `shuffled_advantages.py` (`train.advantage_control`,
  a placebo control).
- **Loss coverage** `is_unsafe (M,) -> (M,) bool`: the rows a loss term covers; the objectives ask it for the KL
  penalty (`kl_prompts.py`, `train.kl_prompts`).
- **Step constraints**: objects with `before_step()` and `after_step()`, called by the engine around every optimiser
  step (`preserve.py`, `train.preserve_prompts=safe`).

`build_levers(config)` reads the config; `Levers.step_constraints` is filled once the models are loaded
(`step_constraints(config, unet, models, mixer)`), since a constraint may depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fastgrpo.levers import kl_prompts, negative_advantages, safe_advantages, shuffled_advantages

AdvantageTransform = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Levers:
    advantage_transforms: tuple[AdvantageTransform, ...] = ()
    kl_covers: Callable[[torch.Tensor], torch.Tensor] = field(default=kl_prompts.every_row)

    def transform_advantages(self, advantages: torch.Tensor, is_unsafe: torch.Tensor, epoch: int) -> torch.Tensor:
        for transform in self.advantage_transforms:
            advantages = transform(advantages, is_unsafe, epoch)
        return advantages


def build_levers(config) -> Levers:
    t = config.train
    transforms = []
    if t.advantage_control == "shuffle":  # first: the levers below then act on the shuffled advantages
        transforms.append(shuffled_advantages.within_groups(config.sample.group_size, config.run.seed))
    if t.safe_advantages == "zero":
        transforms.append(safe_advantages.zero)
    if t.negative_advantages == "zero":
        transforms.append(negative_advantages.zero)
    return Levers(tuple(transforms), kl_prompts.covers(t.kl_prompts))


def step_constraints(config, unet: torch.nn.Module, models, mixer) -> list:
    """The constraints every optimiser step of `unet` must keep (train.preserve_prompts)."""
    if config.train.preserve_prompts != "safe":
        return []
    from fastgrpo.levers.preserve import preserved_subspace

    return [preserved_subspace(unet, models, mixer.safe, config.train.preserve_energy, unsafe_prompts=mixer.unsafe,
                               directions=config.train.update_directions)]
