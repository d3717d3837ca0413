"""The trainer's two UNet loops at a chosen scale, and the on-policy check of a run's first step in each precision.

- rollout: a CFG rollout through `fastgrpo.diffusion.denoise` (UNet + fused DDIM step per step): samples/s,
  transitions/s, peak memory; SDPA and, where it runs, xformers; fp32 and bf16 autocast.
- train step: one optimiser step over a micro-batch of stored transitions (`recompute_log_probs` + `grpo_loss` +
  backward + AdamW), as `policy_update` runs it: transitions/s and peak memory, with and without gradient
  checkpointing.
- first step on policy: sample at the rollout batch size, recompute the log-probs at the (different) training batch
  size before any update, as a run's first step does; record max |ratio - 1| against sd14_safety's clip range
  (extra_info `on_policy_within_clip`). Precisions: fp32, TF32 (CUDA), bf16 autocast over fp32 weights (one
  process), bf16 weights (DeepSpeed's bf16 mode).

FASTGRPO_BENCH_UNET=sd14 uses Stable Diffusion v1.4's UNet (random weights, 860M parameters; meant for a GPU); the
default is the tests' tiny UNet. Only diffusers is needed: prompt embeddings are random at the text encoder's shape.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from conftest import DEVICE, device_info, peak_memory, sync
from fastgrpo.diffusion import DDIMSchedule, Guidance, Trajectories, denoise, recompute_log_probs
from fastgrpo import ops

MODEL = os.environ.get("FASTGRPO_BENCH_UNET", "tiny")
SIZES = {  # rollout samples (one batch), DDIM steps, training micro-batch, latent (C, H, W), text (L, D)
    "tiny": dict(samples=8, steps=10, train_batch=4, latent=(4, 8, 8), text=(77, 32)),
    "sd14": dict(samples=16, steps=20, train_batch=8, latent=(4, 64, 64), text=(77, 768)),
}[MODEL]
CLIP_RANGE = 1e-4  # sd14_safety's train.clip_range


def build_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from fastgrpo.tiny import sd14_unet

    torch.manual_seed(0)
    if MODEL == "sd14":
        return sd14_unet()
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


@pytest.fixture(scope="module")
def world():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    schedule = DDIMSchedule.from_scheduler(scheduler, SIZES["steps"], DEVICE)
    gen = torch.Generator().manual_seed(1)
    samples = SIZES["samples"]
    embeds = torch.randn(samples, *SIZES["text"], generator=gen).to(DEVICE)          # (B, L, D)
    uncond = torch.randn(1, *SIZES["text"], generator=gen).to(DEVICE).expand_as(embeds)
    noise = torch.randn(samples, SIZES["steps"] + 1, *SIZES["latent"], generator=gen).to(DEVICE)
    return build_unet().to(DEVICE), schedule, embeds, uncond, noise


PRECISIONS = {  # name -> (UNet weight dtype, bf16 autocast, TF32)
    "fp32": (torch.float32, False, False),
    "tf32": (torch.float32, False, True),
    "bf16-autocast": (torch.float32, True, False),
    "bf16-weights": (torch.bfloat16, False, False),
}


@contextlib.contextmanager
def precision(unet, name):
    """The UNet in weight dtype `name` with TF32 set as asked; yields the Guidance to run it with."""
    dtype, autocast, tf32 = PRECISIONS[name]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    unet.to(dtype)
    try:
        yield Guidance(1.0, 5.0, "epsilon", autocast_bf16=autocast)
    finally:
        unet.to(torch.float32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def attention_backends() -> list[str]:
    from fastgrpo.models import xformers_unavailable

    return ["sdpa"] + (["xformers"] if xformers_unavailable(DEVICE) is None else [])


def set_attention(unet, name: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    if name == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0())


@pytest.mark.parametrize("attention", attention_backends())
@pytest.mark.parametrize("precision_name", ["fp32", "bf16-autocast"])
def test_rollout(benchmark, world, attention, precision_name):
    unet, schedule, embeds, uncond, noise = world
    set_attention(unet, attention)
    with precision(unet, precision_name) as guidance:
        def rollout():
            return denoise(unet, schedule, noise, embeds, uncond, guidance)

        benchmark.pedantic(rollout, rounds=3, warmup_rounds=1, iterations=1)
        peak = peak_memory(rollout)
    set_attention(unet, "sdpa")
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(device_info(), model=MODEL, attention=attention, precision=precision_name,
                                samples=SIZES["samples"], steps=SIZES["steps"], samples_per_s=SIZES["samples"] / seconds,
                                transitions_per_s=SIZES["samples"] * SIZES["steps"] / seconds,
                                unet_calls_per_s=SIZES["steps"] / seconds, peak_memory_bytes=peak)


def stored_trajectories(unet, schedule, embeds, uncond, noise, guidance) -> Trajectories:
    with torch.no_grad():
        latents, log_probs = denoise(unet, schedule, noise, embeds, uncond, guidance)
    return Trajectories(latents, log_probs, torch.empty(0), torch.arange(latents.shape[0], device=DEVICE))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("precision_name", ["bf16-autocast"])
def test_train_step(benchmark, world, precision_name, checkpointing):
    unet, schedule, embeds, uncond, noise = world
    batch = SIZES["train_batch"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-12)  # a step that changes the weights (by a hair)
    with precision(unet, precision_name) as guidance:
        trajectories = stored_trajectories(unet, schedule, embeds, uncond, noise, guidance)
        samples, steps = torch.arange(batch, device=DEVICE), torch.arange(batch, device=DEVICE) % SIZES["steps"]
        advantages = torch.randn(batch, device=DEVICE)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()

        def train_step():
            log_probs, _ = recompute_log_probs(unet, trajectories, embeds, uncond[:1], schedule, guidance, samples,
                                               steps)
            loss, _ = ops.grpo_loss(log_probs, trajectories.log_probs[samples, steps], advantages,
                                    clip_range=CLIP_RANGE)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            benchmark.pedantic(train_step, rounds=3, warmup_rounds=1, iterations=1)
            peak = peak_memory(train_step)
        finally:
            unet.eval()
            if checkpointing:
                unet.disable_gradient_checkpointing()
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(device_info(), model=MODEL, precision=precision_name, checkpointing=checkpointing,
                                transitions=batch, transitions_per_s=batch / seconds, peak_memory_bytes=peak)


@pytest.mark.parametrize("precision_name", list(PRECISIONS))
def test_first_step_on_policy(benchmark, world, precision_name):
    """Rollout batch != training batch: the stored log-probs against their recomputation before any update."""
    unet, schedule, embeds, uncond, noise = world
    batch = SIZES["train_batch"]
    with precision(unet, precision_name) as guidance:
        trajectories = stored_trajectories(unet, schedule, embeds, uncond, noise, guidance)
        samples = torch.arange(SIZES["samples"], device=DEVICE)

        def recompute():
            ratios = []
            with torch.no_grad():
                for step in range(SIZES["steps"]):
                    for start in range(0, SIZES["samples"], batch):
                        rows = samples[start:start + batch]
                        steps = torch.full_like(rows, step)
                        log_probs, _ = recompute_log_probs(unet, trajectories, embeds, uncond[:1], schedule,
                                                           guidance, rows, steps)
                        ratios.append(torch.exp(log_probs - trajectories.log_probs[rows, steps]))
            sync()
            return torch.cat(ratios)

        ratios = benchmark.pedantic(recompute, rounds=1, iterations=1)
    error = float((ratios - 1).abs().max())
    benchmark.extra_info.update(device_info(), model=MODEL, precision=precision_name,
                                rollout_batch=SIZES["samples"], train_batch=batch, max_abs_ratio_minus_1=error,
                                clip_range=CLIP_RANGE, on_policy_within_clip=error <= CLIP_RANGE)
    print(f"\non-policy {MODEL} {precision_name}: rollout batch {SIZES['samples']}, training batch {batch}: "
          f"max |ratio - 1| = {error:.2e} (clip range {CLIP_RANGE:g}: {'within' if error <= CLIP_RANGE else 'OUT'})")
