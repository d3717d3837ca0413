"""fastgrpo's DDIM ops as a drop-in for ddpo-pytorch's `ddim_step_with_logprob`.

ddpo-pytorch (and the trainers that copied it: DDPO, DanceGRPO's SD path, SafeDiffusion-R1) sample with
`ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta, use_clipped_model_output, generator,
prev_sample)` and recompute the same function's log-prob in training. The function below keeps that signature and
its return value `(prev_sample, log_prob)`, and computes the step with `fastgrpo.ops.ddim_step` / `ddim_logprob` (one
fused kernel on CUDA, the C++ kernel on CPU). Replace the import::

    from ddpo_pytorch.diffusers_patch.ddim_with_logprob import ddim_step_with_logprob   # before
    from ddpo_dropin import ddim_step_with_logprob                                      # after

Supported: epsilon and v prediction, eta > 0, batched timesteps. Not supported (a clear error): clip_sample or
thresholding in the scheduler config (they clip the predicted x_0, which makes the step non-affine; Stable
Diffusion's DDIM config has both off), "sample" prediction, and eta = 0 (no log-prob). The log-prob is in fp32 (fp64
for fp64 inputs) and also differentiable with respect to prev_sample (ddpo-pytorch detaches it; its training loop
passes stored samples, so the results agree). Run it (CPU, a tiny random UNet, a few seconds)::

    python docs/examples/ddpo_dropin.py
"""

from __future__ import annotations

import torch

from example_check import summarise
from fastgrpo import ops


def ddim_step_with_logprob(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False,
                           generator=None, prev_sample=None):
    """One stochastic DDIM step on `self` (a diffusers DDIMScheduler): ddpo-pytorch's contract."""
    config = self.config
    if config.clip_sample or config.thresholding:
        raise ValueError("ddim_step_with_logprob: clip_sample and thresholding are not supported (turn them off in "
                         "the scheduler config, as Stable Diffusion's DDIM config does)")
    if prev_sample is not None and generator is not None:
        raise ValueError("Cannot pass both generator and prev_sample. Please make sure that either `generator` or "
                         "`prev_sample` stays `None`.")
    timestep = torch.as_tensor(timestep).reshape(-1).cpu().long().expand(sample.shape[0])
    prev_timestep = (timestep - config.num_train_timesteps // self.num_inference_steps).clamp(
        0, config.num_train_timesteps - 1)  # ddpo-pytorch clamps before its alpha lookup, as here
    alphas = self.alphas_cumprod
    alpha_t = alphas.gather(0, timestep).to(sample.device)
    alpha_prev = torch.where(prev_timestep >= 0, alphas.gather(0, prev_timestep), self.final_alpha_cumprod)
    settings = dict(eta=eta, prediction_type=config.prediction_type)
    if prev_sample is None:
        noise = torch.randn(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)
        prev_sample, log_prob = ops.ddim_step(model_output, sample, alpha_t, alpha_prev.to(sample.device), noise,
                                              **settings)
    else:
        log_prob = ops.ddim_logprob(model_output, sample, prev_sample, alpha_t, alpha_prev.to(sample.device),
                                    **settings)
    return prev_sample.type(sample.dtype), log_prob


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4).eval()


def noise_prediction(unet, latents, t, text, guidance_scale):
    """The guided noise prediction: one batched call on [uncond; cond], as ddpo-pytorch's pipeline."""
    out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def rollout(unet, scheduler, *, batch=4, steps=6, guidance_scale=5.0, eta=1.0, seed=0,
            step_fn=ddim_step_with_logprob):
    """ddpo-pytorch's sampling loop in miniature: every latent and log-prob kept.
    Returns (text, timesteps, latents (B, steps + 1, ...), log_probs (B, steps))."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randn(batch, 5, 16, generator=gen)
    text = torch.cat([torch.zeros_like(prompt), prompt])
    scheduler.set_timesteps(steps)
    latents = torch.randn(batch, 4, 8, 8, generator=gen)
    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        with torch.no_grad():
            e = noise_prediction(unet, latents, t, text, guidance_scale)
        latents, log_prob = step_fn(scheduler, e, t, latents, eta=eta, generator=gen)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return text, scheduler.timesteps, torch.stack(all_latents, 1), torch.stack(all_log_probs, 1)


def recompute(unet, scheduler, text, timesteps, latents, *, guidance_scale=5.0, eta=1.0,
              step_fn=ddim_step_with_logprob):
    """The training side: each step's log-prob again, from the stored latents, with gradients to the UNet."""
    log_probs = []
    for j, t in enumerate(timesteps):
        e = noise_prediction(unet, latents[:, j], t, text, guidance_scale)
        log_probs.append(step_fn(scheduler, e, t, latents[:, j], eta=eta, prev_sample=latents[:, j + 1])[1])
    return torch.stack(log_probs, 1)


def main() -> int:
    from diffusers import DDIMScheduler

    unet = tiny_unet()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    text, timesteps, latents, log_probs = rollout(unet, scheduler)
    again = recompute(unet, scheduler, text, timesteps, latents)
    return summarise("ddim", unet, log_probs, again, "ddim_step")

if __name__ == "__main__":
    raise SystemExit(main())
