"""The reward interface: kinds are the modules of fastgrpo.rewards; the aesthetic-style linear head against
open_clip's own calls; a new reward is one file; bad reward settings are one line."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from safetensors.torch import save_file

import fastgrpo.rewards
from fastgrpo import cli
from fastgrpo.config import RewardConfig, load_config
from fastgrpo.errors import ConfigError, ModelLoadError
from fastgrpo.reward import SteeringReward
from fastgrpo.rewards import kinds, load_reward


def clip_settings(tiny_clip_files, **options):
    config, checkpoint = tiny_clip_files
    return dict(clip_model=str(config), clip_checkpoint=str(checkpoint), options=options)


def test_kinds_are_the_package_modules():
    assert kinds() == ["aesthetic", "steering"]
    with pytest.raises(ConfigError, match="unknown kind 'nope'"):
        load_config(None, ["reward.kind=nope"])


def test_steering_kind_is_the_steering_reward(tiny_clip_files):
    reward = load_reward(RewardConfig(**clip_settings(tiny_clip_files)), torch.device("cpu"))
    assert isinstance(reward, SteeringReward) and reward.alpha == RewardConfig().alpha


def test_aesthetic_head_matches_open_clip(tiny_clip_files, tmp_path):
    config, checkpoint = tiny_clip_files
    open_clip.add_model_config(config)
    model = open_clip.create_model(config.stem, pretrained=None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    model.eval()
    dim = model.text_projection.shape[1]
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(1, dim, generator=gen), torch.randn(1, generator=gen)
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "head.safetensors"))
    reward = load_reward(RewardConfig(kind="aesthetic", **clip_settings(tiny_clip_files,
                                                                        head=str(tmp_path / "head.safetensors"))),
                         torch.device("cpu"))
    images = torch.rand(5, 3, 24, 16, generator=gen)
    got = reward(images, ["ignored"], torch.zeros(5, dtype=torch.long))
    with torch.no_grad():
        pixels = TF.normalize(TF.center_crop(TF.resize(images, 32, interpolation=TF.InterpolationMode.BICUBIC,
                                                       antialias=True), [32, 32]).clamp(0, 1),
                              open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        z = F.normalize(model.encode_image(pixels).double(), dim=-1)
    expected = z @ weight.double()[0] + bias.double()[0]
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=0)


def test_aesthetic_errors_are_one_line(tiny_clip_files, tmp_path):
    with pytest.raises(ConfigError, match="reward.options.head is required"):
        load_reward(RewardConfig(kind="aesthetic", **clip_settings(tiny_clip_files)), torch.device("cpu"))
    save_file({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ModelLoadError, match="7"):
        load_reward(RewardConfig(kind="aesthetic", **clip_settings(tiny_clip_files,
                                                                   head=str(tmp_path / "wrong.safetensors"))),
                    torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_reward(RewardConfig(kind="aesthetic", **clip_settings(tiny_clip_files, head=str(tmp_path / "no.pt"))),
                    torch.device("cpu"))


NEW_REWARD = '''"""Brightness: the mean pixel value (a reward in one file)."""
DESCRIPTION = "mean pixel value"


def load(config, device, dtype):
    scale = float(config.options.get("scale", "1"))
    return lambda images, prompts, prompt_index: scale * images.mean(dim=(1, 2, 3))
'''


def test_a_new_reward_is_one_file(tmp_path, monkeypatch, tiny_overrides, capsys):
    """A module dropped on the package's path is a kind the trainer runs, with its own options."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "brightness.py").write_text(NEW_REWARD, encoding="utf-8")
    monkeypatch.setattr(fastgrpo.rewards, "__path__", [*fastgrpo.rewards.__path__, str(plugins)])
    assert "brightness" in kinds()
    assert cli.main(["train", "--config", "smoke", *tiny_overrides, "run.epochs=1", "reward.kind=brightness",
                     "reward.options.scale=2"]) == 0
    run_dir = next(o for o in tiny_overrides if o.startswith("run.output_dir=")).split("=", 1)[1]
    epoch = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl") if '"rollout_s"' in line][0]
    assert 0 < epoch["reward_mean"] <= 2  # twice a mean pixel value in [0, 1]
    capsys.readouterr()
    assert cli.main(["train", "--config", "smoke", *tiny_overrides, "reward.kind=missing"]) == 2
    assert "unknown kind 'missing'" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["model.pretrained", "reward.clip_model"])
def test_an_unknown_builtin_name_is_one_line(tiny_overrides, capsys, setting):
    assert cli.main(["train", "--config", "smoke", *tiny_overrides, f"{setting}=builtin:toyworld-nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{setting}: 'builtin:toyworld-nope' names no packaged model" in err
    assert "builtin:toyworld-spots-loose" in err  # the names that do exist


def test_builtin_names_resolve_to_the_packaged_files():
    from fastgrpo import builtin

    assert builtin.packaged_models() == ["toyworld", "toyworld-spots", "toyworld-spots-loose"]
    pipeline = builtin.pipeline_dir("builtin:toyworld-spots")
    assert (pipeline / "model_index.json").is_file() and pipeline.parent.name == "toyworld-spots"
    assert all(p.is_file() for p in builtin.clip_files("builtin:toyworld"))
    assert builtin.packaged_name(pipeline) == "toyworld-spots" and builtin.packaged_name(pipeline.parent) is None
    assert builtin.asset_path("builtin:tiny_safe.txt").is_file()
    assert builtin.pipeline_dir("runs/x") is None and builtin.clip_files("ViT-B-32") is None
