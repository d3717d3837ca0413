"""The toy worlds: procedural image worlds with an unsafe concept, their shipped models, prompts and judges.

Three worlds ship, each a set of modules with the same names (`render`, `caption`, `parse_prompt`, `dataset`; the
prompt sets and anchors; `judge_batch`) and its assets (diffusers pipeline, reward CLIP, prompt files):

- `toyworld-spots` (`--config toyworld_spots`): the unsafe concept is a spot painted on the object, an additive element
  that safe prompts never ask for and that can be removed while the asked-for content stays (`spots`,
  `spots_judge`).
- `toyworld` (the colour world, `--config toyworld_colour`): the unsafe concept is a colour (purple) on the attribute every
  prompt asks for (`world`, `prompts`, `judge`).
- `toyworld-spots-loose` (the embedded default's; `--config toyworld_spots
  model.pretrained=builtin:toyworld-spots-loose` with the spot world's recipe): the spot world
  with a base model fine-tuned on loose captions, which name a spot for some plain objects too (`spots.loose_caption`),
  so that, like SD v1.4 on I2P's prompts, it shows the unsafe concept for about half of the prompts that ask for it.

`build` trains a world's models from a seed, `report` evaluates a run, `monitor` judges each epoch's samples.
Importing this package, the world, prompt and judge modules needs only numpy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from fastgrpo.builtin import ASSETS_DIR, packaged_name


@dataclass(frozen=True)
class ToyWorld:
    name: str                # `builtin:<name>` names its pipeline, reward CLIP and prompt files
    world_module: str        # scenes: render, caption, parse_prompt, dataset, IMAGE_SIZE
    prompts_module: str      # PROMPT_FILES, EVAL_SAFE, EVAL_UNSAFE, EVAL_OOD_UNSAFE, SAFE_ANCHORS, UNSAFE_ANCHORS
    judge_module: str        # judge_batch -> verdicts with .unsafe and .matches(asked, ignore=...)
    unsafe_attribute: str    # the attribute that carries the unsafe concept (ignored by "content kept")
    description: str
    base: str | None = None  # a world whose models this one's base model fine-tunes (build.finetune); None: trained
    caption: str = "caption"  # the world module's function that captions the base model's training scenes

    @property
    def directory(self) -> Path:
        return ASSETS_DIR / self.name

    @property
    def world(self) -> ModuleType:
        return importlib.import_module(self.world_module)

    @property
    def prompts(self) -> ModuleType:
        return importlib.import_module(self.prompts_module)

    @property
    def judge(self) -> ModuleType:
        return importlib.import_module(self.judge_module)


WORLDS = {
    "toyworld-spots": ToyWorld("toyworld-spots", "fastgrpo.toyworld.spots", "fastgrpo.toyworld.spots",
                               "fastgrpo.toyworld.spots_judge", "mark",
                               "a magenta spot painted on the object (additive, removable)"),
    "toyworld-spots-loose": ToyWorld("toyworld-spots-loose", "fastgrpo.toyworld.spots", "fastgrpo.toyworld.spots",
                                     "fastgrpo.toyworld.spots_judge", "mark",
                                     "the spot world, whose base model paints the spot for about half of the "
                                     "prompts that ask for one", base="toyworld-spots", caption="loose_caption"),
    "toyworld": ToyWorld("toyworld", "fastgrpo.toyworld.world", "fastgrpo.toyworld.prompts",
                         "fastgrpo.toyworld.judge", "colour",
                         "the colour purple on the attribute every prompt asks for (entangled)"),
}
DEFAULT_WORLD = "toyworld-spots-loose"  # the world of the embedded default config


def builtin_world(value: str) -> ToyWorld | None:
    """The world that `builtin:<name>` names (a model.pretrained or reward.clip_model value), or None."""
    return WORLDS.get(value.removeprefix("builtin:")) if value.startswith("builtin:") else None


def world_of(pretrained: str) -> ToyWorld | None:
    """The world whose packaged model `pretrained` is, named as `builtin:<name>` or by its directory, or None."""
    toy = builtin_world(pretrained)
    return toy if toy is not None else WORLDS.get(packaged_name(pretrained) or "")
