"""The shipped toy-world models (every world): they load through the normal code paths, the base model obeys prompts
(including the unsafe concept), the reward CLIP knows the world, and the default run plus `fastgrpo eval` work end to
end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastgrpo import cli
from fastgrpo.config import RewardConfig
from fastgrpo.models import load_diffusion_models
from fastgrpo.reward import load_steering_reward
from fastgrpo.toyworld import WORLDS, prompts, spots, world
from fastgrpo.toyworld.report import METRICS

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_shipped_models_are_small_and_load(name):
    size = sum(p.stat().st_size for p in WORLDS[name].directory.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    models = load_diffusion_models(f"builtin:{name}", device=torch.device("cpu"))
    assert models.latent_shape(None) == (4, 8, 8)
    assert models.vae_scale_factor * 8 == world.IMAGE_SIZE


def test_reward_clip_knows_colours_and_shapes():
    """Zero-shot: each render's best-matching caption among all colour x shape captions names its colour and shape."""
    reward = load_steering_reward(RewardConfig(clip_model="builtin:toyworld", safe_anchors=prompts.SAFE_ANCHORS,
                                               unsafe_anchors=prompts.UNSAFE_ANCHORS), torch.device("cpu"))
    images, _, scenes = world.dataset(300, seed=99)
    labels = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    texts = [f"a {c} {s}" for c, s in labels]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    best = (reward.image_embeddings(pixels) @ reward.text_embeddings(texts).T).argmax(dim=1)
    correct = [labels[i] == (s.colour, s.shape) for i, s in zip(best.tolist(), scenes)]
    assert np.mean(correct) >= 0.9
    # v_safe points away from the unsafe colour: purple renders score lower along it than the others
    along = reward.image_embeddings(pixels) @ reward.v_safe
    unsafe = torch.tensor([s.unsafe for s in scenes])
    assert along[unsafe].max() < along[~unsafe].min() or along[unsafe].mean() < along[~unsafe].mean() - 0.1


def test_default_steering_reward_prefers_safe_colours_and_keeps_safe_targets():
    """The colour world's reward config on renders of the asked-for scene in each colour: for every unsafe prompt a safe
    colour scores highest and purple below the safe colours' mean; for every safe prompt its own colour still scores
    highest (steering does not pull safe prompts towards other colours). Plain CLIP (alpha 0) fails the first."""
    from fastgrpo.config import load_config

    reward = load_steering_reward(load_config("toyworld_colour").reward, torch.device("cpu"))
    cases = [(p, True) for p in prompts.TRAIN_UNSAFE + prompts.EVAL_UNSAFE + prompts.EVAL_OOD_UNSAFE] + \
            [(p, False) for p in prompts.TRAIN_SAFE + prompts.EVAL_SAFE]
    for text, unsafe in cases:
        asked = world.parse_prompt(text)
        fixed = {a: asked.get(a, default) for a, default in (("shape", "circle"), ("size", "big"),
                                                             ("background", "white"))}
        renders = [world.render(world.Scene(fixed["shape"], colour, fixed["size"], fixed["background"], (16, 16),
                                            10.0 if fixed["size"] == "big" else 5.0)) for colour in world.COLOURS]
        pixels = torch.from_numpy(np.stack(renders)).permute(0, 3, 1, 2).float() / 255
        scores = reward(pixels, [text], torch.zeros(len(renders), dtype=torch.long))
        by_colour = dict(zip(world.COLOURS, scores.tolist()))
        if unsafe:  # the best render is a safe colour, and purple is below the safe colours' mean
            safe_scores = [by_colour[c] for c in world.SAFE_COLOURS]
            assert max(by_colour, key=by_colour.get) != world.UNSAFE_COLOUR, (text, by_colour)
            assert by_colour[world.UNSAFE_COLOUR] < np.mean(safe_scores), (text, by_colour)
        else:
            assert max(by_colour, key=by_colour.get) == asked["colour"], (text, by_colour)


def test_spot_reward_clip_knows_the_world():
    """Zero-shot on spot-world renders: the best caption among colour x shape x (plain, spotted) names all three for
    >= 90% of renders, and v_safe separates spotted from plain renders."""
    reward = load_steering_reward(RewardConfig(clip_model="builtin:toyworld-spots", safe_anchors=spots.SAFE_ANCHORS,
                                               unsafe_anchors=spots.UNSAFE_ANCHORS), torch.device("cpu"))
    images, _, scenes = spots.dataset(300, seed=99)
    labels = [(c, s, m) for c in spots.COLOURS for s in spots.SHAPES for m in spots.MARKS]
    texts = [f"a {'spotted ' if m == 'spot' else ''}{c} {s}" for c, s, m in labels]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    best = (reward.image_embeddings(pixels) @ reward.text_embeddings(texts).T).argmax(dim=1)
    assert np.mean([labels[i] == (s.colour, s.shape, s.mark) for i, s in zip(best.tolist(), scenes)]) >= 0.9
    along = reward.image_embeddings(pixels) @ reward.v_safe
    unsafe = torch.tensor([s.unsafe for s in scenes])
    assert along[unsafe].mean() < along[~unsafe].mean() - 0.1


def test_spot_reward_prefers_the_plain_object_and_keeps_content():
    """The spot world's reward config on renders of the asked-for scene, plain and spotted, in each colour: for every unsafe
    prompt the plain render of the asked-for colour scores highest (the spot goes, the content stays); for every safe
    prompt too."""
    from fastgrpo.config import load_config

    reward = load_steering_reward(load_config("toyworld_spots").reward, torch.device("cpu"))
    for text in spots.TRAIN_UNSAFE + spots.EVAL_UNSAFE + spots.EVAL_OOD_UNSAFE + spots.TRAIN_SAFE + spots.EVAL_SAFE:
        asked = spots.parse_prompt(text)
        fixed = {a: asked.get(a, default) for a, default in (("shape", "circle"), ("size", "big"),
                                                             ("background", "white"))}
        labels = [(colour, mark) for colour in spots.COLOURS for mark in spots.MARKS]
        renders = [spots.render(spots.Scene(fixed["shape"], colour, fixed["size"], fixed["background"], (16, 16),
                                            10.0 if fixed["size"] == "big" else 5.0, mark=mark))
                   for colour, mark in labels]
        pixels = torch.from_numpy(np.stack(renders)).permute(0, 3, 1, 2).float() / 255
        scores = reward(pixels, [text], torch.zeros(len(renders), dtype=torch.long)).tolist()
        assert labels[int(np.argmax(scores))] == (asked["colour"], "plain"), (text, dict(zip(labels, scores)))


def test_loose_base_model_paints_the_spot_about_half_the_time():
    """The loose spot world's base model, sampled like a training rollout: the spot comes for 30-70% of unsafe
    training prompts where the spot world's base model, from the same noise, paints it for more than 75%; safe
    prompts stay plain (>= 90%, about as often as in the spot world) and accurate."""
    from fastgrpo.config import load_config
    from fastgrpo.evaluate import Policies, generate
    from fastgrpo.toyworld import spots_judge

    config = load_config("toyworld_spots")
    unsafe_prompts, safe_prompts = spots.TRAIN_UNSAFE[::3], spots.TRAIN_SAFE[::4]

    def judged(name):
        models = load_diffusion_models(f"builtin:{name}", device=torch.device("cpu"))
        policies = Policies(models, models.unet, None, config)
        unsafe = spots_judge.judge_batch(generate(policies, models.unet, unsafe_prompts, samples_per_prompt=4, seed=3))
        safe = spots_judge.judge_batch(generate(policies, models.unet, safe_prompts, samples_per_prompt=2, seed=3))
        return np.mean([v.unsafe for v in unsafe]), safe

    loose_rate, loose_safe = judged("toyworld-spots-loose")
    spot_rate, _ = judged("toyworld-spots")
    assert 0.3 <= loose_rate <= 0.7 and spot_rate > 0.75, (loose_rate, spot_rate)
    assert np.mean([not v.unsafe for v in loose_safe]) >= 0.9
    asked = [spots.parse_prompt(p) for p in safe_prompts for _ in range(2)]
    assert np.mean([v.colour == a["colour"] and v.shape == a["shape"] for v, a in zip(loose_safe, asked)]) >= 0.85


def test_loose_world_build_fine_tunes_the_spot_worlds_models(tmp_path):
    """`build --world toyworld-spots-loose` (a few steps here): a loadable pipeline whose VAE is the spot world's and
    whose UNet moved, the spot world's reward CLIP, and the prompt files."""
    from safetensors.torch import load_file

    from fastgrpo.prompts import load_prompts
    from fastgrpo.toyworld import build

    out = tmp_path / "loose"
    assert build.main(["--world", "toyworld-spots-loose", "--out", str(out), "--num-images", "256",
                       "--unet-steps", "3"]) == 0
    built = load_diffusion_models(str(out / "pipeline"), device=torch.device("cpu"))
    base = load_diffusion_models("builtin:toyworld-spots", device=torch.device("cpu"))
    for (name, a), b in zip(built.vae.state_dict().items(), base.vae.state_dict().values()):
        assert torch.equal(a, b), name
    moved = [not torch.equal(a, b) for a, b in zip(built.unet.state_dict().values(), base.unet.state_dict().values())]
    assert any(moved)
    clip = WORLDS["toyworld-spots"].directory / "clip" / "toyworld-clip.safetensors"
    copied = load_file(str(out / "clip" / "toyworld-clip.safetensors"))
    assert all(torch.equal(copied[k], v) for k, v in load_file(str(clip)).items())
    assert load_prompts(str(out / "train_unsafe.txt")) == spots.TRAIN_UNSAFE


@pytest.mark.parametrize("config", ["default", "toyworld_colour"])
def test_default_run_and_eval(tmp_path, capsys, config):
    """One epoch of the embedded default (the loose spot world) and of the colour world, then `fastgrpo eval`: report
    files, numbers in range, and the base model obeys prompts (>= 80% attribute accuracy on safe prompts; unsafe on
    >= 50% of the unsafe prompts, >= 30% for the loose world's base model, which paints the spot for about half)."""
    from fastgrpo.config import load_config
    from fastgrpo.toyworld import world_of

    toy = world_of(load_config(config).model.pretrained)
    least_unsafe = 0.3 if toy.name == "toyworld-spots-loose" else 0.5
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--config", config, "run.epochs=1", "sample.prompts_per_epoch=4", "run.progress=false",
                     "run.tensorboard=false", f"run.output_dir={run_dir}"]) == 0
    epoch_line = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                  if "rollout_s" in r][0]
    # the base model's own samples, judged during training (training prompts ask for all four attributes, so
    # their accuracy runs below the evaluation set's); it draws the unsafe colour when asked
    assert 0 < epoch_line["judged_safe_accuracy"] <= 1 and epoch_line["judged_unsafe_rate"] >= least_unsafe
    assert epoch_line["reward_group_std_safe"] > 0 and epoch_line["advantage_abs_unsafe"] > 0.5
    assert cli.main(["eval", str(run_dir), "--samples-per-prompt", "1"]) == 0
    printed = capsys.readouterr().out
    assert "unsafe rate" in printed and "report written" in printed
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    sizes = {"unsafe": len(toy.prompts.EVAL_UNSAFE), "ood_unsafe": len(toy.prompts.EVAL_OOD_UNSAFE),
             "safe": len(toy.prompts.EVAL_SAFE)}
    assert report["info"]["counts"] == sizes  # one image per prompt of each held-out set, none dropped
    for metric, (prompt_set, _, _) in METRICS.items():  # each rate is a count of those images
        for model in ("base", "trained"):
            hits = report[metric][model] * sizes[prompt_set]
            assert abs(hits - round(hits)) <= 5e-5 * sizes[prompt_set] and 0 <= round(hits) <= sizes[prompt_set]
    assert report["safe_accuracy"]["base"] >= 0.8
    for task in ("single_object", "colors"):  # one asked attribute each: at least as often right as all of them
        for model in ("base", "trained"):
            assert report["safe_accuracy"][model] <= report["geneval_tasks"][task][model] <= 1
    assert report["unsafe_rate"]["base"] >= least_unsafe and report["ood_unsafe_rate"]["base"] >= least_unsafe
    for name in ("report.md", "metrics.png", "grid_safe.png", "grid_unsafe.png", "grid_ood_unsafe.png"):
        assert (run_dir / "eval" / name).is_file(), name


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "missing")]) == 2
    assert cli.main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("fastgrpo: error: eval:") for line in err)


def test_eval_checks_a_real_runs_checkpoint_and_a_toy_runs_arguments(tmp_path, capsys):
    from fastgrpo.config import load_config, render_yaml

    config = load_config(None, ["model.pretrained=builtin:tiny-random"])
    (tmp_path / "config.yaml").write_text(render_yaml(config))
    (tmp_path / "checkpoints" / "epoch_0").mkdir(parents=True)
    (tmp_path / "checkpoints" / "epoch_0" / "trainer_state.pt").write_bytes(b"")
    assert cli.main(["eval", str(tmp_path)]) == 2  # a real model's run gets the safety report: its UNet is missing
    assert "holds no diffusion_pytorch_model.safetensors" in capsys.readouterr().err
    config = load_config(None, [])
    (tmp_path / "config.yaml").write_text(render_yaml(config))  # a toy-world run: the arguments are checked next
    assert cli.main(["eval", str(tmp_path), "--device", "bogus"]) == 2
    assert cli.main(["eval", str(tmp_path), "--samples-per-prompt", "0"]) == 2
    assert cli.main(["eval", str(tmp_path), "--prompts", "i2p.csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--device" in err[0] and "--samples-per-prompt" in err[1] and "--prompts" in err[2]
