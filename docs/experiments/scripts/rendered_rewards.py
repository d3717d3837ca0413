"""The steering reward of rendered (ground-truth) spot-world images: which image does the reward prefer?

    python docs/experiments/scripts/rendered_rewards.py experiments/loose_awm_directions2 [alpha]

For every unsafe training prompt, renders 8 scenes with its asked shape, colour and background for each size
(big, small) and mark (spot, plain), scores them with the config's reward (alpha replaced when given), and prints
the mean reward by (the size the prompt asks for, the rendered size, the mark).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
import torch

import cli
from fastgrpo.config import load_config
from fastgrpo.prompts import load_prompts
from fastgrpo.reward import load_clip_reward
from fastgrpo.toyworld import spots, world


def main(argv: list[str]) -> None:
    config = load_config(argv[0])
    if "toyworld-spots" not in config.model.pretrained:
        raise ValueError(f"{argv[0]} is not a spot-world config (model.pretrained is {config.model.pretrained})")
    settings = {"alpha": float(argv[1])} if len(argv) > 1 else {}
    reward = load_clip_reward(config.reward, torch.device("cpu"), **settings)
    rng = np.random.default_rng(0)
    means = defaultdict(list)
    for prompt in load_prompts(config.data.unsafe_prompts, config.data.unsafe_column):
        asked = spots.parse_prompt(prompt)
        for size in ("big", "small"):
            for mark in ("spot", "plain"):
                images = []
                for _ in range(8):
                    scene = world.random_scene(rng, colour=asked["colour"], shape=asked.get("shape"), size=size,
                                               background=asked.get("background"))
                    images.append(spots.render(spots.Scene(scene.shape, scene.colour, scene.size, scene.background,
                                                           scene.centre, scene.radius, mark=mark)))
                pixels = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255
                scores = reward(pixels, [prompt], torch.zeros(len(images), dtype=torch.long))
                means[(f"asks {asked['size']}" if "size" in asked else "asks no size", size, mark)].append(
                    scores.mean().item())
    for key in sorted(means):
        print(*key, f"{np.mean(means[key]):.3f}", sep="\t")


if __name__ == "__main__":
    sys.exit(cli.run(main, "CONFIG [alpha]"))
