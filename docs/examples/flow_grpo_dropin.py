"""fastgrpo's flow-matching SDE op as a drop-in for flow_grpo's `sde_step_with_logprob`.

flow_grpo (SD3.5, FLUX) samples with `sde_step_with_logprob(scheduler, model_output, timestep, sample, noise_level,
prev_sample, generator, sde_type)` and recomputes the same function's log-prob in its training loop. The function
below keeps that signature and return value, `(prev_sample, log_prob, prev_sample_mean, std_dev_t)`, and computes
the step with `fastgrpo.ops.flow_sde_step` / `flow_sde_logprob` (one fused kernel on CUDA, the C++ kernel on CPU).
Replace the import in flow_grpo's pipeline and training script::

    from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob   # before
    from flow_grpo_dropin import sde_step_with_logprob                                 # after

What differs: the log-prob is also differentiable with respect to prev_sample (flow_grpo detaches it; its training
loop passes stored samples, which need no gradient, so the results agree); noise is drawn in fp32 as flow_grpo does
after its upcast. Run it (CPU, a tiny random SD3 transformer, a few seconds)::

    python docs/examples/flow_grpo_dropin.py
"""

from __future__ import annotations

import torch

from example_check import summarise
from fastgrpo import ops
from fastgrpo.ops import reference


def sde_step_with_logprob(self, model_output, timestep, sample, noise_level=0.7, prev_sample=None, generator=None,
                          sde_type="sde"):
    """One flow-matching SDE step on `self` (a diffusers FlowMatchEulerDiscreteScheduler): flow_grpo's contract."""
    model_output, sample = model_output.float(), sample.float()
    step_index = [self.index_for_timestep(t) for t in timestep]
    sigma = self.sigmas[step_index].to(sample.device)
    sigma_prev = self.sigmas[[index + 1 for index in step_index]].to(sample.device)
    settings = dict(noise_level=noise_level, sde_type=sde_type, sigma_max=self.sigmas[1].item())
    if prev_sample is None:
        noise = torch.randn(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)
        prev_sample, log_prob = ops.flow_sde_step(model_output, sample, sigma, sigma_prev, noise, **settings)
    else:
        prev_sample = prev_sample.float()
        log_prob = ops.flow_sde_logprob(model_output, sample, prev_sample, sigma, sigma_prev, **settings)
    # the mean and std_t for callers that use them (flow_grpo's KL term): from the same step table
    table = reference.flow_sde_coefficients(sigma.double(), sigma_prev.double(), **settings).float()
    prev_sample_mean, _ = reference.step_moments(model_output, sample, table)
    shape = (-1,) + (1,) * (sample.dim() - 1)
    dt = (sigma_prev - sigma).view(shape)
    std_dev_t = table[:, 2].view(shape) / (-dt).sqrt() if sde_type == "sde" else table[:, 2].view(shape)
    return prev_sample, log_prob, prev_sample_mean, std_dev_t


def tiny_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def velocity(transformer, latents, t, text, pooled, guidance_scale):
    """The guided velocity: one batched call on [uncond; cond], as flow_grpo's pipeline."""
    out = transformer(hidden_states=torch.cat([latents] * 2), encoder_hidden_states=text, pooled_projections=pooled,
                      timestep=t.expand(2 * latents.shape[0])).sample
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def rollout(transformer, scheduler, *, batch=4, steps=6, guidance_scale=4.5, noise_level=0.7, sde_type="sde",
            seed=0, step_fn=sde_step_with_logprob):
    """flow_grpo's sampling loop in miniature: CFG against an empty prompt, every latent and log-prob kept.
    Returns (conditioning, timesteps, latents (B, steps + 1, ...), log_probs (B, steps))."""
    gen = torch.Generator().manual_seed(seed)
    prompt, pooled = torch.randn(batch, 5, 16, generator=gen), torch.randn(batch, 16, generator=gen)
    conditioning = (torch.cat([torch.zeros_like(prompt), prompt]), torch.cat([torch.zeros_like(pooled), pooled]))
    scheduler.set_timesteps(steps)
    latents = torch.randn(batch, 4, 8, 8, generator=gen)
    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        with torch.no_grad():
            v = velocity(transformer, latents, t, *conditioning, guidance_scale)
        latents, log_prob, _, _ = step_fn(scheduler, v, t.expand(batch), latents, noise_level=noise_level,
                                          generator=gen, sde_type=sde_type)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return conditioning, scheduler.timesteps, torch.stack(all_latents, 1), torch.stack(all_log_probs, 1)


def recompute(transformer, scheduler, conditioning, timesteps, latents, *, guidance_scale=4.5, noise_level=0.7,
              sde_type="sde", step_fn=sde_step_with_logprob):
    """The training side: each step's log-prob again, from the stored latents, with gradients to the model."""
    log_probs = []
    for j, t in enumerate(timesteps):
        v = velocity(transformer, latents[:, j], t, *conditioning, guidance_scale)
        _, log_prob, _, _ = step_fn(scheduler, v, t.expand(latents.shape[0]), latents[:, j], noise_level=noise_level,
                                    prev_sample=latents[:, j + 1], sde_type=sde_type)
        log_probs.append(log_prob)
    return torch.stack(log_probs, 1)


def main() -> int:
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = tiny_transformer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    failed = 0
    for sde_type in ("sde", "cps"):
        conditioning, timesteps, latents, log_probs = rollout(transformer, scheduler, sde_type=sde_type)
        again = recompute(transformer, scheduler, conditioning, timesteps, latents, sde_type=sde_type)
        failed |= summarise(sde_type, transformer, log_probs, again, "flow_sde_step")
    return failed

if __name__ == "__main__":
    raise SystemExit(main())
