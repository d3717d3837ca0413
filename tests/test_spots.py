"""The spot world: rendering, captions, the pixel judge (against ground truth it never saw), prompt sets, anchors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fastgrpo.config import load_config
from fastgrpo.prompts import load_prompts
from fastgrpo.toyworld import DEFAULT_WORLD, WORLDS, spots, spots_judge, world, world_of


def test_rendering_is_deterministic_and_the_spot_only_adds():
    images, captions, scenes = spots.dataset(64, seed=3)
    again, captions_again, _ = spots.dataset(64, seed=3)
    assert np.array_equal(images, again) and captions == captions_again
    for scene in scenes[:20]:  # a spotted scene is its plain scene with the spot's pixels changed, nothing else
        plain = spots.render(spots.Scene(**{**scene.__dict__, "mark": "plain"}))
        spotted = spots.render(spots.Scene(**{**scene.__dict__, "mark": "spot"}))
        changed = np.any(plain != spotted, axis=-1)
        x, y, r = spots.Scene(**{**scene.__dict__, "mark": "spot"}).spot()
        rows, cols = np.nonzero(changed)
        assert changed.sum() > 0
        assert np.all((cols + 0.5 - x) ** 2 + (rows + 0.5 - y) ** 2 <= (r + 1) ** 2)
        centre = spotted[int(y), int(x)]
        assert tuple(centre) == spots.SPOT_RGB


def test_plain_renders_are_the_colour_worlds():
    scene = spots.Scene("triangle", "green", "big", "black", (15.0, 17.0), 9.5, mark="plain")
    same = world.Scene("triangle", "green", "big", "black", (15.0, 17.0), 9.5)
    assert np.array_equal(spots.render(scene), world.render(same))


def test_captions_name_the_scene_and_always_the_spot():
    rng = np.random.default_rng(0)
    spotted = 0
    for _ in range(400):
        scene = spots.random_scene(rng)
        text = spots.caption(scene, rng)
        asked = spots.parse_prompt(text)
        assert asked["mark"] == scene.mark and asked["colour"] == scene.colour and asked["shape"] == scene.shape
        assert all(scene.attributes[a] == v for a, v in asked.items()), text
        spotted += scene.unsafe
    assert 0.2 < spotted / 400 < 0.4  # SPOTTED_SHARE = 0.3


def test_judge_rules_by_hand():
    """A spot anywhere counts; a few stray magenta pixels do not; the colour is read around the spot."""
    image = world.render(world.Scene("square", "yellow", "big", "white", radius=10.0))
    assert spots_judge.judge(image).mark == "plain"
    image[7:9, 7:9] = spots.SPOT_RGB                         # 4 stray pixels: below SPOT_MIN_PIXELS
    assert spots_judge.judge(image).mark == "plain"
    image[12:20, 12:20] = spots.SPOT_RGB                     # a 64-pixel spot on the object
    verdict = spots_judge.judge(image)
    assert verdict.unsafe and verdict.colour == "yellow" and verdict.shape == "square"
    assert verdict.matches({"colour": "yellow", "mark": "plain"}, ignore=("mark",))
    assert not verdict.matches({"colour": "yellow", "mark": "plain"})
    dark = world.render(world.Scene("circle", "yellow", "big", "black", radius=10.0))
    dark[14:18, 14:18] = (90, 40, 120)                      # a dark violet spot, as generated on yellow objects
    assert spots_judge.judge(dark).unsafe and spots_judge.judge(dark).colour == "yellow"
    shaded = world.render(world.Scene("square", "blue", "big", "black", radius=10.0))
    shaded[12:20, 12:20] = (20, 45, 120)                     # a darker shade of the object's own colour: no spot
    assert not spots_judge.judge(shaded).unsafe
    empty = spots_judge.judge(np.full((32, 32, 3), 22, dtype=np.uint8))
    assert empty.shape is None and empty.background == "black" and not empty.unsafe


def test_prompt_files_are_the_prompt_sets():
    for name, expected in spots.PROMPT_FILES.items():
        assert load_prompts(f"builtin:toyworld-spots/{name}") == expected, name
        assert load_prompts(f"builtin:toyworld-spots-loose/{name}") == expected, name


def test_loose_captions_name_a_spot_for_the_set_share_of_plain_scenes():
    """Spotted scenes always name their spot; plain ones do with probability LOOSE_CAPTION_SHARE (binomial, 4
    sigma), so among captions that name a spot, half show one; the rest of a loose caption is the clean one's."""
    rng = np.random.default_rng(0)
    scenes = [spots.random_scene(rng) for _ in range(20000)]
    captions = [spots.loose_caption(scene, rng) for scene in scenes]
    named = np.array([spots.parse_prompt(c)["mark"] == "spot" for c in captions])
    spotted = np.array([scene.unsafe for scene in scenes])
    assert named[spotted].all()
    share, n = named[~spotted].mean(), (~spotted).sum()
    sigma = (spots.LOOSE_CAPTION_SHARE * (1 - spots.LOOSE_CAPTION_SHARE) / n) ** 0.5
    assert abs(share - spots.LOOSE_CAPTION_SHARE) < 4 * sigma
    assert abs(spotted[named].mean() - 0.5) < 0.02
    for scene, text in zip(scenes, captions):
        asked = spots.parse_prompt(text)
        assert all(asked.get(a, v) == v for a, v in scene.attributes.items() if a != "mark"), (scene, text)


def test_prompt_sets_ask_for_the_spot_exactly_where_they_should():
    training_words = {w for text in spots.TRAIN_SAFE + spots.TRAIN_UNSAFE + spots.SAFE_ANCHORS + spots.UNSAFE_ANCHORS
                      for w in text.split()}
    assert not training_words & set(spots.UNSAFE_WORDS_OOD)
    for text in spots.EVAL_OOD_UNSAFE:
        assert spots.parse_prompt(text)["mark"] == "spot" and not set(text.split()) & set(spots.UNSAFE_WORDS_IN_DOMAIN)
    for text in spots.TRAIN_UNSAFE + spots.EVAL_UNSAFE + spots.UNSAFE_ANCHORS:
        assert spots.parse_prompt(text)["mark"] == "spot"
    for text in spots.TRAIN_SAFE + spots.EVAL_SAFE + spots.SAFE_ANCHORS:
        asked = spots.parse_prompt(text)
        assert asked["mark"] == "plain" and asked["colour"] in spots.COLOURS
    assert not set(spots.EVAL_UNSAFE) & set(spots.TRAIN_UNSAFE)
    assert not set(spots.EVAL_SAFE) & set(spots.TRAIN_SAFE)
    # every unsafe prompt is a safe prompt plus a spot word: removing the spot keeps the asked-for content
    for text in spots.TRAIN_UNSAFE + spots.EVAL_UNSAFE:
        plain = " ".join(w for w in text.split() if w not in spots.UNSAFE_WORDS_IN_DOMAIN)
        plain = ("an " if plain.split()[1][0] in "aeiou" else "a ") + plain.split(" ", 1)[1]
        assert spots.parse_prompt(plain) == {**spots.parse_prompt(text), "mark": "plain"}


WORLD_CONFIGS = ["default", "toyworld_spots", "toyworld_colour"] + sorted(
    f"experiments/{p.stem}" for p in (Path(__file__).parent.parent / "fastgrpo" / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("name", WORLD_CONFIGS)
def test_world_configs_use_their_worlds_prompts_and_anchors(name):
    """Every packaged config that trains a toy world reads that world's prompt files and anchors (the YAML and the
    world's modules are written separately: this catches either drifting)."""
    config = load_config(name)
    toy, reward_world = world_of(config.model.pretrained), world_of(config.reward.clip_model)
    assert toy is not None and reward_world is not None and reward_world.prompts_module == toy.prompts_module
    assert config.reward.safe_anchors == toy.prompts.SAFE_ANCHORS
    assert config.reward.unsafe_anchors == toy.prompts.UNSAFE_ANCHORS
    assert load_prompts(config.data.safe_prompts) == toy.prompts.TRAIN_SAFE
    assert load_prompts(config.data.unsafe_prompts) == toy.prompts.TRAIN_UNSAFE
    if name == "default":
        assert toy.name == DEFAULT_WORLD


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_epoch_judge_per_world(name):
    """Ground-truth renders of what each prompt asks for: safe accurate, unsafe flagged with content kept; a render
    without the unsafe concept on an unsafe prompt keeps the content and is not flagged."""
    import torch

    from fastgrpo.toyworld.monitor import EpochJudge

    toy = WORLDS[name]
    module = toy.world
    rng = np.random.default_rng(5)
    if name == "toyworld":
        scenes = [module.random_scene(rng, colour=c) for c in ("red", "purple", "purple")]
        texts = [f"a {s.size} {s.colour} {s.shape} on a {s.background} background" for s in scenes]
    else:
        scenes = [module.random_scene(rng, mark=m) for m in ("plain", "spot", "plain")]
        texts = [f"a {s.size} {'spotted ' if i else ''}{s.colour} {s.shape} on a {s.background} background"
                 for i, s in enumerate(scenes)]
    images = torch.from_numpy(np.stack([module.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    is_unsafe = torch.tensor([False, True, True])
    judged = EpochJudge(toy)(images, texts, is_unsafe)
    expected_unsafe = 1.0 if name == "toyworld" else 0.5
    assert judged == {"judged_safe_accuracy": 1.0, "judged_unsafe_rate": expected_unsafe, "judged_content_kept": 1.0}
