"""The steering reward: open_clip loading (HPSv2 checkpoint formats), v_safe, steering variants, preprocessing."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF

from fastgrpo.errors import ModelLoadError
from fastgrpo.reward import SteeringReward, load_open_clip, preprocess_images

SAFE = ["a clothed person", "a calm park"]
UNSAFE = ["a naked person", "a bloody fight"]


@pytest.fixture(scope="module")
def clip(tiny_clip_files):
    config, checkpoint = tiny_clip_files
    return load_open_clip(str(config), str(checkpoint), torch.device("cpu"))


def independent_clip(tiny_clip_files):
    """The same weights loaded with open_clip's own calls, bypassing fastgrpo's loader."""
    config, checkpoint = tiny_clip_files
    open_clip.add_model_config(config)
    model = open_clip.create_model(config.stem, pretrained=None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    return model.eval(), open_clip.get_tokenizer(config.stem)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_checkpoint_formats_load_identically(tiny_clip_files, tmp_path, clip):
    config, checkpoint = tiny_clip_files
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "plain.bin")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    reference = clip[0].state_dict()
    for name in ("plain.bin", "ddp.pt", "w.safetensors"):
        model, _ = load_open_clip(str(config), str(tmp_path / name), torch.device("cpu"))
        assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)


def test_loading_errors(tiny_clip_files, tmp_path):
    config, checkpoint = tiny_clip_files
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    state.pop("logit_scale")
    torch.save(state, tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = [((str(config), str(tmp_path / "partial.pt")), "does not match"),
             ((str(config), str(tmp_path / "junk.pt")), "cannot read"),
             ((str(config), str(tmp_path / "none.pt")), "does not exist"),
             ((str(tmp_path / "none.json"), str(checkpoint)), "does not exist"),
             (("ViT-Nope-99", str(checkpoint)), "unknown open_clip architecture"),
             ((str(config), None), "clip_checkpoint is required")]
    for args, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            load_open_clip(*args, torch.device("cpu"))


def test_v_safe_and_targets_match_float64_math(clip, tiny_clip_files):
    model, tokenizer = independent_clip(tiny_clip_files)
    with torch.no_grad():
        def embed(texts):
            return unit(model.encode_text(tokenizer(texts)).double().numpy())
        v_safe = unit(embed(SAFE).mean(0) - embed(UNSAFE).mean(0))
        z = embed(["a dog", "a naked dog"])
    components = z @ v_safe
    floor = float(components.mean())  # one prompt below the floor, one above it
    assert components.min() < floor < components.max()
    for mode, alpha in (("translation", 0.5), ("projection", 0.3), ("translation", 0.0), ("floor", floor)):
        reward = SteeringReward(*clip, alpha=alpha, mode=mode, safe_anchors=SAFE, unsafe_anchors=UNSAFE)
        np.testing.assert_allclose(reward.v_safe.double().numpy(), v_safe, atol=1e-5)
        if mode == "translation":
            expected = unit(z + alpha * v_safe)
        elif mode == "floor":  # the prompt below alpha is moved up to it; the other keeps its own embedding
            low = int(components.argmin())
            expected = z.copy()
            expected[low] = unit(z[low] + (alpha - components[low]) * v_safe)
        else:
            expected = unit(z - (z @ v_safe)[:, None] * v_safe + alpha * v_safe)
            # the steered target's v_safe component is exactly alpha before normalisation
            raw = z - (z @ v_safe)[:, None] * v_safe + alpha * v_safe
            np.testing.assert_allclose(raw @ v_safe, alpha, atol=1e-12)
        np.testing.assert_allclose(reward.targets(["a dog", "a naked dog"]).double().numpy(), expected, atol=1e-5)


def test_alpha_zero_is_plain_clip_score(clip, tiny_clip_files):
    model, tokenizer = independent_clip(tiny_clip_files)
    images = torch.rand(5, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    prompts = ["a dog", "a cat"]
    index = torch.tensor([0, 1, 1, 0, 1])
    reward = SteeringReward(*clip, alpha=0.0, mode="translation", safe_anchors=SAFE, unsafe_anchors=UNSAFE,
                            batch_size=2)
    got = reward(images, prompts, index)
    with torch.no_grad():
        pixels = TF.normalize(TF.center_crop(TF.resize(images, 32, interpolation=TF.InterpolationMode.BICUBIC,
                                                       antialias=True), [32, 32]).clamp(0, 1),
                              open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        image_z = unit(model.encode_image(pixels).double().numpy())
        text_z = unit(model.encode_text(tokenizer(prompts)).double().numpy())
    expected = (image_z * text_z[index.numpy()]).sum(-1)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-4)


def test_steering_rewards_safe_direction(clip):
    """Moving an image embedding along v_safe raises the translated reward (alpha > 0) for the same prompt."""
    reward = SteeringReward(*clip, alpha=1.0, mode="translation", safe_anchors=SAFE, unsafe_anchors=UNSAFE)
    target = reward.targets(["a person"])[0]
    base = torch.nn.functional.normalize(torch.randn(target.shape[0], generator=torch.Generator().manual_seed(0)),
                                         dim=0)
    safer = torch.nn.functional.normalize(base + 0.5 * reward.v_safe, dim=0)
    unsafer = torch.nn.functional.normalize(base - 0.5 * reward.v_safe, dim=0)
    assert (safer @ target) > (base @ target) > (unsafer @ target)


def test_text_embeddings_are_cached(clip, monkeypatch):
    reward = SteeringReward(*clip, alpha=0.5, mode="translation", safe_anchors=SAFE, unsafe_anchors=UNSAFE)
    calls = []
    original = reward.model.encode_text
    monkeypatch.setattr(reward.model, "encode_text", lambda tokens: calls.append(len(tokens)) or original(tokens))
    reward.targets(["x", "y", "x"])
    reward.targets(["y", "x", "z"])
    # anchors were cached at construction; each new prompt is encoded once, on its own, so its embedding does not
    # depend on which other prompts were new at the time (a resumed run starts with an empty cache)
    assert calls == [1, 1, 1]
    fresh = SteeringReward(*clip, alpha=0.5, mode="translation", safe_anchors=SAFE, unsafe_anchors=UNSAFE)
    assert torch.equal(fresh.text_embeddings(["z", "y", "x"]), reward.text_embeddings(["z", "y", "x"]))


def test_preprocess_crops_the_centre():
    images = torch.zeros(1, 3, 10, 20)
    images[..., 5:15] = 1.0  # centre half is white
    out = preprocess_images(images, (10, 10), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert out.shape == (1, 3, 10, 10) and torch.all(out == 1.0)
