"""Rollout and training throughput of the trainer's pieces on the tiny random model (samples/s, steps/s).

The tiny model keeps this runnable on a 2-core CPU; on a GPU the same benchmark tracks the framework overhead
around the UNet (per-step op calls, noise drawing, host syncs) rather than UNet speed.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, device_info
from fastgrpo.diffusion import DDIMSchedule, Guidance, RolloutSettings, recompute_log_probs, sample_trajectories
from fastgrpo.engine import SingleProcessEngine
from fastgrpo.config import TrainConfig
from fastgrpo.grpo import LossSettings, ddpo_loss_fn, plan_update, policy_update
from fastgrpo.models import encode_prompts, load_diffusion_models
from fastgrpo.tiny import build_tiny_pipeline

NUM_STEPS, GROUP, PROMPTS = 10, 4, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = build_tiny_pipeline(tmp_path_factory.mktemp("bench") / "pipeline")
    models = load_diffusion_models(str(directory), device=DEVICE)
    prompts = ["a red apple", "a blue car", "a naked person", "a bloody fight"]
    embeds = encode_prompts(models, prompts)
    uncond = encode_prompts(models, [""])
    schedule = DDIMSchedule.from_scheduler(models.scheduler, NUM_STEPS, DEVICE)
    sample_prompt = torch.arange(PROMPTS, device=DEVICE).repeat_interleave(GROUP)
    settings = RolloutSettings(models.latent_shape(None), GROUP, 16, False, 0)
    return models, embeds, uncond, schedule, sample_prompt, settings


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_rollout(benchmark, setup, backend):
    models, embeds, uncond, schedule, sample_prompt, settings = setup
    guidance = Guidance(1.0, 5.0, models.prediction_type, backend)
    ids = torch.arange(sample_prompt.shape[0])  # sample ids stay on the host (they key the noise)

    def rollout():
        return sample_trajectories(models.unet, models.vae, schedule, embeds, uncond, sample_prompt, ids, guidance,
                                   settings, epoch=0)

    benchmark.pedantic(rollout, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(device_info(), samples=int(ids.shape[0]), steps=NUM_STEPS,
                                samples_per_s=ids.shape[0] / benchmark.stats.stats.median)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_training_epoch(benchmark, setup, backend):
    models, embeds, uncond, schedule, sample_prompt, settings = setup
    guidance = Guidance(1.0, 5.0, models.prediction_type, backend)
    ids = torch.arange(sample_prompt.shape[0])  # sample ids stay on the host (they key the noise)
    trajectories = sample_trajectories(models.unet, models.vae, schedule, embeds, uncond, sample_prompt, ids,
                                       guidance, settings, epoch=0)
    advantages = torch.randn(ids.shape[0], device=DEVICE)
    engine = SingleProcessEngine(models.unet, TrainConfig(learning_rate=1e-6))

    def train_epoch():
        plan = plan_update(ids.cpu(), NUM_STEPS, 1.0, torch.Generator().manual_seed(0))
        plan.order, plan.steps = plan.order.to(DEVICE), plan.steps.to(DEVICE)
        policy_fn = lambda s, t: recompute_log_probs(models.unet, trajectories, embeds, uncond,  # noqa: E731
                                                     schedule, guidance, s, t)
        loss_fn = ddpo_loss_fn(policy_fn, None, trajectories.log_probs, advantages, LossSettings(1e-4, 0.0, backend))
        return list(policy_update(engine, loss_fn, plan, batch_size=8, samples_per_step=16))

    benchmark.pedantic(train_epoch, rounds=3, warmup_rounds=1, iterations=1)
    transitions = ids.shape[0] * NUM_STEPS
    benchmark.extra_info.update(device_info(), transitions=transitions,
                                transitions_per_s=transitions / benchmark.stats.stats.median)
