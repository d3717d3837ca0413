"""Config loading, overrides and validation; the packaged configs; the generated reference docs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastgrpo.config import load_config, parse_override, render_markdown, render_yaml
from fastgrpo.errors import ConfigError

from conftest import REPO

PACKAGED = ["default", "smoke", "sd14_safety", "toyworld_spots", "toyworld_colour"] + sorted(
    f"experiments/{p.stem}" for p in (REPO / "fastgrpo" / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("name", PACKAGED)
def test_a_rendered_config_loads_back_equal(name, tmp_path):
    """A run's config.yaml (`render_yaml`) is loadable with --config and gives the same config, for every packaged
    config and with keys away from their defaults."""
    config = load_config(name, ["train.learning_rate=3e-6", "reward.safe_anchors=[a, 'b: c']", "run.seed=7"])
    path = tmp_path / "config.yaml"
    path.write_text(render_yaml(config), encoding="utf-8")
    assert load_config(str(path)) == config
    assert load_config(str(path)) != load_config(name)  # the overrides survived the round trip


def test_overrides_are_typed():
    config = load_config(None, ["train.learning_rate=3e-6", "sample.num_steps=20", "sample.resolution=512",
                                "reward.safe_anchors=[a, b]", "sample.same_noise_per_group=true", "run.resume=latest"])
    assert config.train.learning_rate == 3e-6 and config.sample.num_steps == 20
    assert config.sample.resolution == 512 and config.reward.safe_anchors == ["a", "b"]
    assert config.sample.same_noise_per_group is True and config.run.resume == "latest"
    assert load_config(None, ["train.kl_coef=1"]).train.kl_coef == 1.0  # int accepted for float
    assert load_config(None, ["sample.resolution=null"]).sample.resolution is None


def test_sd14_config_has_paper_settings():
    config = load_config("sd14_safety")
    assert (config.sample.group_size, config.sample.eta, config.sample.num_steps, config.sample.guidance_scale) == \
        (16, 1.0, 50, 5.0)
    assert (config.reward.alpha, config.train.clip_range, config.train.adv_clip_max, config.train.learning_rate) == \
        (0.5, 1e-4, 2.5, 1e-5)


@pytest.mark.parametrize("override, message", [
    ("train.learnin_rate=1", "unknown config key 'train.learnin_rate'"),
    ("sample.group_size=1", "sample.group_size must be >= 2"),
    ("train.clip_range=0", "train.clip_range must be > 0"),
    ("train.clip_range=-1", "train.clip_range must be > 0"),
    ("sample.eta=0", "train.objective=ddpo needs eta > 0"),
    ("sample.eta=1.5", "sample.eta must be in [0, 1]"),
    ("sample.num_steps=ten", "sample.num_steps: expected int"),
    ("sample.num_steps=2.5", "sample.num_steps: expected int"),
    ("run.progress=1", "run.progress: expected bool"),
    ("reward.mode=rotate", "reward.mode must be one of translation, projection, floor"),
    ("train.samples_per_step=3", "train.samples_per_step (3) must be a positive multiple"),
    ("data.unsafe_fraction=1.5", "data.unsafe_fraction must be in [0, 1]"),
    ("reward.safe_anchors=oops", "reward.safe_anchors: expected a list"),
    ("sample=3", "sample: expected a mapping"),
    ("nonsense", "is not of the form"),
])
def test_bad_values_raise_one_line(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("toyworld_colour", [override])  # the paper's objective (ddpo), which some checks concern
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_kl_on_safe_prompts_needs_the_closed_form_estimator():
    with pytest.raises(ConfigError, match="train.kl_prompts=safe needs train.kl_estimator=mean"):
        load_config("toyworld_colour", ["train.kl_prompts=safe", "train.kl_estimator=sample"])
    assert load_config("toyworld_colour", ["train.kl_prompts=safe"]).train.kl_prompts == "safe"


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sample: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    good = tmp_path / "good.yaml"
    good.write_text("sample:\n  group_size: 8\n", encoding="utf-8")
    assert load_config(str(good), ["sample.group_size=4"]).sample.group_size == 4  # overrides win


def test_parse_override_nests():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert parse_override("run.output_dir=runs/x=y") == {"run": {"output_dir": "runs/x=y"}}


def test_docs_are_generated_from_the_config():
    assert (REPO / "docs" / "config.md").read_text(encoding="utf-8") == render_markdown(), \
        "docs/config.md is stale: regenerate with `fastgrpo config --markdown > docs/config.md`"


@pytest.mark.parametrize("args", [["sample.group_size=1"], ["--config", "nope.yaml"], ["bogus.key=1"]])
def test_cli_bad_config_exits_2_with_one_line(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastgrpo.cli", "train", *args], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgrpo: error:"), result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_trainable_modules_select_parameters(tiny_pipeline_dir):
    import torch

    from fastgrpo.errors import ConfigError
    from fastgrpo.models import load_diffusion_models, select_trainable

    unet = load_diffusion_models(str(tiny_pipeline_dir), device=torch.device("cpu")).unet
    total = sum(p.numel() for p in unet.parameters())
    assert select_trainable(unet, []) == total
    expected = sum(p.numel() for name, p in unet.named_parameters() if ".attn2.to_k." in name or ".attn2.to_v." in name)
    assert 0 < select_trainable(unet, ["attn2.to_k", "attn2.to_v"]) == expected < total
    assert all(p.requires_grad == (".attn2.to_k." in n or ".attn2.to_v." in n) for n, p in unet.named_parameters())
    with pytest.raises(ConfigError, match="matches no UNet parameter"):
        select_trainable(unet, ["no_such_module"])
    with pytest.raises(ConfigError, match="lora.target_modules"):
        load_config("toyworld_colour", ["lora.rank=4", "train.trainable_modules=[attn2.to_k]"])


@pytest.mark.parametrize("packaged, experiment", [
    ("default", "experiments/loose_nft_directions2_prediction_200_alpha05_cosine"),
    ("toyworld_colour", "experiments/colour_ddpo")])
def test_packaged_recipes_are_their_recorded_experiments(packaged, experiment):
    """The README quotes the embedded default's (and the colour world's) results from these experiments' recorded
    runs: every key but the output directory is the same."""
    import dataclasses

    config, recorded = load_config(packaged), load_config(experiment)
    assert dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir="x")) == \
        dataclasses.replace(recorded, run=dataclasses.replace(recorded.run, output_dir="x"))
