"""The steering reward of a run's images split into its two parts: which images does it rank above which?

    python docs/experiments/scripts/reward_parts.py RUN_DIR [ALPHA ...]

With v = v_safe and z the prompt's text embedding, `floor` and `projection` targets are normalize(z_perp + a v),
z_perp = z - (z . v) v, so an image's reward is a weighted sum of its content part C = z_img . normalize(z_perp)
(what the prompt asks for apart from the unsafe concept) and its safety part S = z_img . v, with weights |z_perp| and
a. For the first 24 unsafe training prompts, 4 images each from the run's base model and from its newest checkpoint
(the evaluation sampler, seed 7) are judged by the toy world's judge and grouped by (model, unsafe?, content kept?);
the script prints each group's mean C, S and reward at the run's alpha and at every ALPHA given.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

import cli
from fastgrpo.evaluate import generate, load_policies, load_run, toy_world_of
from fastgrpo.prompts import load_prompts
from fastgrpo.reward import load_clip_reward

PROMPTS, IMAGES = 24, 4


def _alphas(texts: list[str]) -> list[float]:
    try:
        return [float(text) for text in texts]
    except ValueError:
        raise ValueError(f"ALPHA must be numbers, got {' '.join(texts)!r}") from None


def main(argv: list[str]) -> None:
    extra = _alphas(argv[1:])
    config, checkpoint = load_run(argv[0])
    toy = toy_world_of(config)
    if toy is None:
        raise ValueError(f"{argv[0]} does not train a toy world (model.pretrained is {config.model.pretrained})")
    alphas = [config.reward.alpha, *extra]
    device = torch.device("cpu")
    policies = load_policies(config, checkpoint, device)
    rewards = [load_clip_reward(config.reward, device, alpha=alpha) for alpha in alphas]
    prompts = load_prompts(config.data.unsafe_prompts, config.data.unsafe_column)[:PROMPTS]
    index = torch.arange(len(prompts)).repeat_interleave(IMAGES)
    v_safe = rewards[0].v_safe
    text = rewards[0].text_embeddings(prompts)
    content_direction = F.normalize(text - (text @ v_safe)[:, None] * v_safe, dim=-1)[index]
    groups = defaultdict(list)
    for model, unet in (("base", policies.models.unet), ("trained", policies.trained_unet)):
        images = generate(policies, unet, prompts, samples_per_prompt=IMAGES, seed=7)
        embedded = rewards[0].image_embeddings(images)
        parts = [(embedded * content_direction).sum(-1), embedded @ v_safe,
                 *(reward(images, prompts, index) for reward in rewards)]
        for i, verdict in enumerate(toy.judge.judge_batch(images)):
            asked = toy.world.parse_prompt(prompts[index[i]])
            kept = verdict.matches(asked, ignore=(toy.unsafe_attribute,))
            key = (model, "unsafe" if verdict.unsafe else "safe", "content kept" if kept else "content lost")
            groups[key].append([part[i].item() for part in parts])
    print(f"prompts: mean z . v_safe {(text @ v_safe).mean().item():+.3f}")
    print("model", "image", "content", "images", "C", "S", *(f"reward a={alpha:g}" for alpha in alphas), sep="\t")
    for key in sorted(groups):
        means = np.mean(groups[key], axis=0)
        print(*key, len(groups[key]), *(f"{m:+.3f}" for m in means), sep="\t")


if __name__ == "__main__":
    sys.exit(cli.run(main, "RUN_DIR [ALPHA ...]"))
