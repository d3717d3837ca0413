"""Images of the models under evaluation, sampled the way diffusers' StableDiffusionPipeline samples them with a DDIM
scheduler, so a number here means what it means for a stock pipeline.

The N images of a prompt come from `torch.Generator("cpu").manual_seed(prompt.seed)`: first the (N, C, h, w) initial
latents, then, when eta > 0, each step's (N, C, h, w) noise, in the order the pipeline draws them for
`num_images_per_prompt=N`. Every model under evaluation gets the same noise, so differences between their images
come from their weights. Classifier-free guidance uses each prompt's own scale (guidance <= 1 means none, as in the
pipeline). `tests/test_safety_eval.py::test_sampler_matches_stable_diffusion_pipeline` holds the equivalence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrpo.diffusion import decode_latents
from fastgrpo.safety.prompts import EvalPrompt


@dataclass(frozen=True)
class SamplerSettings:
    num_steps: int = 50           # DDIM steps
    eta: float = 0.0              # DDIM eta (0: deterministic after the initial latent)
    samples_per_prompt: int = 4   # images per prompt
    batch_size: int = 8           # images per UNet call (rounded to whole prompts)


def prompt_noise(prompts: list[EvalPrompt], settings: SamplerSettings, latent_shape: tuple[int, int, int],
                 device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial latents (K * N, C, h, w) and, with eta > 0, step noise (S, K * N, C, h, w), prompt-major."""
    count = settings.samples_per_prompt
    initial, steps = [], []
    for prompt in prompts:
        gen = torch.Generator("cpu").manual_seed(prompt.seed)
        initial.append(torch.randn((count, *latent_shape), generator=gen))
        if settings.eta > 0:
            steps.append(torch.stack([torch.randn((count, *latent_shape), generator=gen)
                                      for _ in range(settings.num_steps)]))
    step_noise = torch.cat(steps, dim=1).to(device) if steps else None
    return torch.cat(initial).to(device), step_noise


@torch.no_grad()
def sample_images(unet, vae, scheduler, prompts: list[EvalPrompt], cond_embeds: torch.Tensor,
                  uncond_embed: torch.Tensor, settings: SamplerSettings) -> torch.Tensor:
    """(K * N, 3, H, W) fp32 images in [0, 1] for K prompts (cond_embeds (K, L, D), uncond_embed (1, L, D))."""
    count = settings.samples_per_prompt
    device, dtype = next(unet.parameters()).device, unet.dtype
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents, step_noise = prompt_noise(prompts, settings, latent_shape, device)
    latents = latents * scheduler.init_noise_sigma
    guidance = torch.tensor([p.guidance_scale for p in prompts], device=device).repeat_interleave(count)
    guided = guidance > 1                                                      # (K * N,)
    cond = cond_embeds.repeat_interleave(count, dim=0).to(dtype)              # (K * N, L, D)
    embeds = torch.cat([uncond_embed.expand_as(cond).to(dtype), cond]) if bool(guided.any()) else cond
    scheduler.set_timesteps(settings.num_steps, device=device)
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = torch.cat([latents, latents]) if embeds.shape[0] > cond.shape[0] else latents
        output = unet(scheduler.scale_model_input(model_input, timestep).to(dtype), timestep,
                      encoder_hidden_states=embeds).sample
        if embeds.shape[0] > cond.shape[0]:
            uncond_out, cond_out = output.chunk(2)
            scale = guidance.view(-1, 1, 1, 1).to(output.dtype)
            output = torch.where(guided.view(-1, 1, 1, 1), uncond_out + scale * (cond_out - uncond_out), cond_out)
        noise = None if step_noise is None else step_noise[index].to(output.dtype)
        latents = scheduler.step(output, timestep, latents, eta=settings.eta, variance_noise=noise).prev_sample
    return decode_latents(vae, latents)
