"""Model loading and stochastic DDIM rollouts on a tiny random SD model, against diffusers' own DDIMScheduler."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler

from fastgrpo.diffusion import (DDIMSchedule, Guidance, RolloutSettings, recompute_log_probs, sample_trajectories)
from fastgrpo.errors import ModelLoadError
from fastgrpo.models import encode_prompts, load_diffusion_models

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tiny_pipeline_dir):
    return load_diffusion_models(str(tiny_pipeline_dir), device=CPU)


def rollout(models, *, group_size=2, batch_size=4, same_noise=False, guidance_scale=5.0, num_steps=4, seed=0,
            keep_noise=False):
    prompts = ["a red apple", "a naked person"]
    embeds = encode_prompts(models, prompts)
    uncond = encode_prompts(models, [""])
    schedule = DDIMSchedule.from_scheduler(models.scheduler, num_steps, CPU)
    guidance = Guidance(1.0, guidance_scale, models.prediction_type)
    sample_prompt = torch.arange(2).repeat_interleave(group_size)
    settings = RolloutSettings(models.latent_shape(None), group_size, batch_size, same_noise, seed, keep_noise)
    trajectories = sample_trajectories(models.unet, models.vae, schedule, embeds, uncond, sample_prompt,
                                       torch.arange(sample_prompt.shape[0]), guidance, settings, epoch=0)
    return trajectories, embeds, uncond, schedule, guidance


def test_components_are_frozen_except_unet(models):
    assert all(p.requires_grad for p in models.unet.parameters())
    assert not any(p.requires_grad for p in models.vae.parameters())
    assert not any(p.requires_grad for p in models.text_encoder.parameters())
    assert models.latent_shape(None) == (4, 8, 8) and models.latent_shape(32) == (4, 16, 16)


def test_bad_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_diffusion_models(str(tmp_path / "nope"), device=CPU)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline directory"):
        load_diffusion_models(str(tmp_path / "empty"), device=CPU)


def test_trajectory_shapes_and_dtypes(models):
    trajectories, *_ = rollout(models)
    assert trajectories.latents.shape == (4, 5, 4, 8, 8) and trajectories.latents.dtype == torch.float32
    assert trajectories.log_probs.shape == (4, 4) and trajectories.log_probs.dtype == torch.float32
    assert trajectories.images.shape == (4, 3, 16, 16)
    assert 0.0 <= trajectories.images.min() and trajectories.images.max() <= 1.0
    assert torch.isfinite(trajectories.log_probs).all()


def test_steps_equal_diffusers_ddim_step(models, tiny_pipeline_dir):
    trajectories, embeds, uncond, schedule, _ = rollout(models)
    scheduler = DDIMScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler")
    scheduler.set_timesteps(4)
    from fastgrpo.diffusion import draw_noise
    ids = torch.arange(4)
    noise = draw_noise(0, 0, ids, ids // 2, 4, (4, 8, 8), same_noise_per_group=False, device=CPU)
    assert torch.equal(trajectories.latents[:, 0], noise[:, 0])
    cond = embeds[trajectories.prompt_index]
    with torch.no_grad():
        for j, t in enumerate(scheduler.timesteps):
            x = trajectories.latents[:, j]
            out = models.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand_as(cond), cond]))
            noise_uncond, noise_cond = out.sample.chunk(2)
            guided = noise_uncond + 5.0 * (noise_cond - noise_uncond)
            expected = scheduler.step(guided, t, x, eta=1.0, variance_noise=noise[:, j + 1]).prev_sample
            torch.testing.assert_close(trajectories.latents[:, j + 1], expected, rtol=1e-5, atol=1e-5)


def test_recomputed_log_probs_match_sampling(models):
    """Ratio == 1 before any update, even with a different batch composition than sampling used."""
    trajectories, embeds, uncond, schedule, guidance = rollout(models)
    samples = torch.tensor([3, 0, 2])
    steps = torch.tensor([0, 3, 1])
    with torch.no_grad():
        recomputed, kl = recompute_log_probs(models.unet, trajectories, embeds, uncond, schedule, guidance, samples,
                                             steps)
    assert kl is None
    ratio = torch.exp(recomputed - trajectories.log_probs[samples, steps])
    assert torch.all((ratio - 1).abs() <= 1e-5), ratio


def perturbed(unet, seed):
    """A copy of the UNet with every weight moved by 0.02 * N(0, 1)."""
    import copy

    other = copy.deepcopy(unet)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
    return other


def diffusers_step_drift(tiny_pipeline_dir, unets, trajectories, embeds, uncond, n, j):
    """(mean((mu_a - mu_b)^2) / (2 sigma^2), sigma^2) for sample n at step j: both means from diffusers'
    DDIMScheduler.step (CFG 5, eta 1, zero noise) under unets (a, b), sigma^2 the scheduler's variance."""
    scheduler = DDIMScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler")
    scheduler.set_timesteps(4)
    cond = embeds[trajectories.prompt_index]
    t, x = scheduler.timesteps[j], trajectories.latents[n:n + 1, j]
    means = []
    with torch.no_grad():
        for unet in unets:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond[n:n + 1]])).sample
            noise_uncond, noise_cond = out.double().chunk(2)
            guided = noise_uncond + 5.0 * (noise_cond - noise_uncond)
            means.append(scheduler.step(guided, t, x.double(), eta=1.0, variance_noise=torch.zeros_like(x)
                                        ).prev_sample)
    variance = float(scheduler._get_variance(t, t - scheduler.config.num_train_timesteps // 4))
    return float(((means[0] - means[1]) ** 2).mean()) / (2 * variance), variance


def test_closed_form_kl_matches_diffusers_means(models, tiny_pipeline_dir):
    """KL to a perturbed reference UNet = mean((mu - mu_ref)^2) / (2 sigma^2), with both means from diffusers'
    DDIMScheduler.step (zero noise) and sigma^2 = eta^2 * the scheduler's variance; zero against itself."""
    import contextlib

    trajectories, embeds, uncond, schedule, guidance = rollout(models)
    reference = perturbed(models.unet, seed=1)
    samples, steps = torch.tensor([0, 1, 3, 2]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        _, kl = recompute_log_probs(models.unet, trajectories, embeds, uncond, schedule, guidance, samples, steps,
                                    reference=lambda: contextlib.nullcontext(reference))
        _, kl_self = recompute_log_probs(models.unet, trajectories, embeds, uncond, schedule, guidance, samples,
                                         steps, reference=lambda: contextlib.nullcontext(models.unet))
    torch.testing.assert_close(kl_self, torch.zeros(4), rtol=0, atol=1e-5)
    for i, (n, j) in enumerate(zip(samples.tolist(), steps.tolist())):
        expected, _ = diffusers_step_drift(tiny_pipeline_dir, (models.unet, reference), trajectories, embeds, uncond,
                                           n, j)
        assert expected > 1e-4  # the perturbation is large enough to test something
        assert abs(float(kl[i]) - expected) <= 1e-3 * expected + 1e-6, (j, float(kl[i]), expected)


def test_ratio_norm_bias_is_the_drift_between_diffusers_means(models, tiny_pipeline_dir):
    """train.ratio_norm (GRPO-Guard): the ratio bias is mean((mu - mu_old)^2) / (2 sigma^2) and the scale sigma,
    with mu (the updated UNet) and mu_old (the rollout's UNet) both from diffusers' DDIMScheduler.step with zero
    noise, sigma^2 = the scheduler's variance (eta 1); the bias is zero before any update."""
    with pytest.raises(ValueError, match="keep_noise"):
        rollout_without_noise = rollout(models)
        recompute_log_probs(models.unet, *rollout_without_noise[:4], rollout_without_noise[4], torch.tensor([0]),
                            torch.tensor([0]), ratio_norm=True)
    trajectories, embeds, uncond, schedule, guidance = rollout(models, keep_noise=True)
    assert trajectories.noise.shape == (4, 5, 4, 8, 8)
    updated = perturbed(models.unet, seed=3)
    samples, steps = torch.tensor([2, 0, 3, 1]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        _, _, bias_before, _ = recompute_log_probs(models.unet, trajectories, embeds, uncond, schedule, guidance,
                                                   samples, steps, ratio_norm=True)
        _, kl, bias, std = recompute_log_probs(updated, trajectories, embeds, uncond, schedule, guidance, samples,
                                               steps, ratio_norm=True)
    assert kl is None
    torch.testing.assert_close(bias_before, torch.zeros(4), rtol=0, atol=1e-6)
    for i, (n, j) in enumerate(zip(samples.tolist(), steps.tolist())):
        expected, variance = diffusers_step_drift(tiny_pipeline_dir, (updated, models.unet), trajectories, embeds,
                                                  uncond, n, j)
        assert expected > 1e-4  # the perturbation is large enough to test something
        assert abs(float(bias[i]) - expected) <= 1e-3 * expected + 1e-6, (j, float(bias[i]), expected)
        assert float(std[i]) == pytest.approx(variance ** 0.5, rel=1e-5)


def test_noise_is_per_sample_and_independent_of_batch_size(models):
    small, *_ = rollout(models, batch_size=1)
    large, *_ = rollout(models, batch_size=4)
    torch.testing.assert_close(small.latents, large.latents, rtol=1e-4, atol=1e-4)
    initial = large.latents[:, 0].flatten(1)
    assert not torch.allclose(initial[0], initial[1])  # own initial noise within a group
    shared, *_ = rollout(models, same_noise=True)
    initial = shared.latents[:, 0]
    assert torch.equal(initial[0], initial[1]) and torch.equal(initial[2], initial[3])
    assert not torch.allclose(initial[0], initial[2])
    assert not torch.allclose(shared.latents[0, -1], shared.latents[1, -1])  # step noise stays independent


def test_without_cfg_one_unet_call_per_step(models, monkeypatch):
    calls = []
    forward = models.unet.forward
    monkeypatch.setattr(models.unet, "forward", lambda x, *a, **k: calls.append(x.shape[0]) or forward(x, *a, **k))
    rollout(models, guidance_scale=1.0, batch_size=4)
    assert calls == [4] * 4
    calls.clear()
    rollout(models, guidance_scale=5.0, batch_size=4)
    assert calls == [8] * 4  # cond and uncond batched into one call


def test_deterministic_last_step_is_rejected(tiny_pipeline_dir, tmp_path):
    config = json.loads((tiny_pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler = DDIMScheduler.from_config({**config, "set_alpha_to_one": True})
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        DDIMSchedule.from_scheduler(scheduler, 4, CPU)
