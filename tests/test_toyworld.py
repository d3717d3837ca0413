"""The toy world: deterministic rendering and captions, the pixel judge, the prompt sets and anchors."""

from __future__ import annotations

import numpy as np
import pytest

from fastgrpo.prompts import load_prompts
from fastgrpo.toyworld import WORLDS, judge, prompts, world


def test_rendering_is_deterministic_and_seeded():
    images, captions, _ = world.dataset(64, seed=3)
    again, captions_again, _ = world.dataset(64, seed=3)
    other, _, _ = world.dataset(64, seed=4)
    assert np.array_equal(images, again) and captions == captions_again
    assert not np.array_equal(images, other)


def test_render_pixels():
    """A big square's centre has the palette colour, a corner the background; coverage makes edges a blend."""
    scene = world.Scene("square", "blue", "big", "white", centre=(16.0, 16.0), radius=10.0)
    image = world.render(scene)
    assert tuple(image[16, 16]) == world.PALETTE["blue"]
    assert tuple(image[0, 0]) == world.BACKGROUND_RGB["white"]
    covered = (np.abs(np.arange(32) + 0.5 - 16) <= 10).sum()
    assert covered == 20
    half = world.Scene("square", "red", "big", "black", centre=(16.0, 16.0), radius=10.5)  # edge inside a pixel
    edge = world.render(half)[16, 5]  # pixel 5 spans [5, 6); the square starts at 5.5: half covered
    expected = 0.5 * np.array(world.PALETTE["red"]) + 0.5 * np.array(world.BACKGROUND_RGB["black"])
    assert np.abs(edge - np.round(expected)).max() <= 1


def test_captions_name_the_scene():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = world.random_scene(rng)
        text = world.caption(scene, rng)
        asked = world.parse_prompt(text)
        assert asked["colour"] == scene.colour and asked["shape"] == scene.shape
        assert all(scene.attributes[a] == v for a, v in asked.items()), text
        assert text.split()[0] == ("an" if text.split()[1][0] in "aeiou" else "a")


def _judge_accuracy(toy, images, scenes):
    verdicts = toy.judge.judge_batch(images)
    correct = [v.attributes == s.attributes and v.unsafe == s.unsafe for v, s in zip(verdicts, scenes)]
    return float(np.mean(correct))


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_judge_on_ground_truth_renders(name):
    images, _, scenes = WORLDS[name].world.dataset(2000, seed=11)
    assert _judge_accuracy(WORLDS[name], images, scenes) >= 0.98
    assert 0.15 < np.mean([s.unsafe for s in scenes]) < 0.4  # a fifth purple; 30% spotted


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_judge_on_noisy_renders(name):
    """Generated images are not clean: Gaussian pixel noise (sigma 6/255) must not change the verdicts."""
    images, _, scenes = WORLDS[name].world.dataset(1000, seed=12)
    noise = np.random.default_rng(0).normal(0, 6, images.shape)
    noisy = np.clip(images + noise, 0, 255).round().astype(np.uint8)
    assert _judge_accuracy(WORLDS[name], noisy, scenes) >= 0.98


def test_judge_flags_partly_unsafe_images_and_empty_images():
    image = world.render(world.Scene("square", "green", "big", "white", radius=10.0))
    image[2:7, 2:7] = world.PALETTE["purple"]  # a 25-pixel purple patch beside a green object
    verdict = judge.judge(image)
    assert verdict.unsafe and verdict.colour == "green"
    empty = judge.judge(np.full((32, 32, 3), 238, dtype=np.uint8))
    assert empty.shape is None and not empty.unsafe and not empty.matches({"shape": "circle"})
    assert empty.matches({"background": "white"})


def test_judge_accepts_tensors():
    torch = pytest.importorskip("torch")
    images, _, scenes = world.dataset(16, seed=5)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert [v.attributes for v in judge.judge_batch(tensor)] == [s.attributes for s in scenes]


def test_prompt_files_are_the_prompt_sets():
    for name, expected in prompts.PROMPT_FILES.items():
        assert load_prompts(f"builtin:toyworld/{name}") == expected, name


def test_out_of_domain_words_never_reach_training_prompts_or_anchors():
    training_words = {w for text in prompts.TRAIN_SAFE + prompts.TRAIN_UNSAFE + prompts.SAFE_ANCHORS
                      + prompts.UNSAFE_ANCHORS for w in text.split()}
    assert not training_words & set(world.UNSAFE_WORDS_OOD)
    for text in prompts.EVAL_OOD_UNSAFE:
        assert world.parse_prompt(text)["colour"] == world.UNSAFE_COLOUR
        assert not set(text.split()) & set(world.UNSAFE_WORDS_IN_DOMAIN)
    for text in prompts.TRAIN_UNSAFE + prompts.EVAL_UNSAFE:
        assert world.parse_prompt(text)["colour"] == world.UNSAFE_COLOUR
    for text in prompts.TRAIN_SAFE + prompts.EVAL_SAFE:
        assert world.parse_prompt(text)["colour"] in world.SAFE_COLOURS
    assert not set(prompts.EVAL_SAFE) & set(prompts.TRAIN_SAFE)
    assert not set(prompts.EVAL_UNSAFE) & set(prompts.TRAIN_UNSAFE)


def test_epoch_judgement_on_ground_truth_renders():
    """Renders of exactly what the prompts ask for: all safe ones accurate; unsafe ones unsafe with content kept."""
    import torch

    from fastgrpo.toyworld import WORLDS
    from fastgrpo.toyworld.monitor import EpochJudge

    judge_epoch = EpochJudge(WORLDS["toyworld"])
    rng = np.random.default_rng(3)
    scenes = [world.random_scene(rng, colour=c) for c in ("red", "blue", "purple", "purple", "green")]
    images = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    texts = [f"a {s.size} {s.colour} {s.shape} on a {s.background} background" for s in scenes]
    is_unsafe = torch.tensor([s.colour == "purple" for s in scenes])
    assert judge_epoch(images, texts, is_unsafe) == {"judged_safe_accuracy": 1.0, "judged_unsafe_rate": 1.0,
                                                     "judged_content_kept": 1.0}
    wrong = texts[:2] + [t.replace("purple", "yellow") for t in texts[2:4]] + ["a big red square"]
    judged = judge_epoch(images, [t.replace("red", "blue") if i == 0 else t for i, t in enumerate(wrong)], is_unsafe)
    assert judged["judged_safe_accuracy"] == pytest.approx(1 / 3) and judged["judged_unsafe_rate"] == 1.0


def test_training_curves_from_run_directories(tmp_path, capsys):
    import json

    from PIL import Image

    from fastgrpo.plots import main as plots_main

    for name, slope in (("a", 0.1), ("b", -0.1)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"epoch": e, "step": e, "rollout_s": 1.0, "judged_safe_accuracy": 0.5 + slope * e,
                  "judged_unsafe_rate": None} for e in range(4)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "curves.png"
    assert plots_main([str(out), f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"]) == 0
    image = Image.open(out).convert("RGB")
    colours = {image.getpixel((x, y)) for x in range(0, image.width, 2) for y in range(0, 200, 2)}
    assert (40, 110, 200) in colours and (200, 60, 40) in colours  # both runs drawn in the first panel
    assert plots_main([str(out), f"c={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
