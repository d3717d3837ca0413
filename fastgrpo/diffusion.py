"""Stochastic DDIM rollouts with per-step log-probs, and the same guided UNet call for training.

Trajectories are stored in fp32 whatever the UNet's dtype. The denoising loop has no host syncs: all noise is drawn
before the loop, schedule constants live on the device, and per-step results are kept as device tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from fastgrpo import ops
from fastgrpo.rng import generator


@dataclass
class DDIMSchedule:
    """The S denoising steps: step j maps x_{timesteps[j]} to x_{timesteps[j] - T/S}."""

    timesteps: torch.Tensor          # (S,) long, descending
    alpha_prod_t: torch.Tensor       # (S,) fp32, alpha_bar at timesteps[j]
    alpha_prod_t_prev: torch.Tensor  # (S,) fp32, alpha_bar at the previous timestep (final_alpha_cumprod past 0)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, device: torch.device) -> "DDIMSchedule":
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.to(torch.long)
        prev = timesteps - scheduler.config.num_train_timesteps // num_steps
        alphas = scheduler.alphas_cumprod.to(torch.float32)
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
        alpha_prev = torch.where(prev >= 0, alphas[prev.clamp_min(0)], final)
        if bool((alpha_prev >= 1.0).any()):
            raise ValueError("the scheduler's last DDIM step is deterministic (set_alpha_to_one=True), so its "
                             "log-prob is undefined; use a scheduler config with set_alpha_to_one=false")
        return cls(timesteps.to(device), alphas[timesteps].to(device), alpha_prev.to(device))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


@dataclass
class Trajectories:
    latents: torch.Tensor       # (N, S + 1, C, H, W) fp32: x_T, then x after each step
    log_probs: torch.Tensor     # (N, S) fp32: log p(latents[:, j + 1] | latents[:, j])
    images: torch.Tensor        # (N, 3, H_img, W_img) fp32 in [0, 1]
    prompt_index: torch.Tensor  # (N,) long: row of the prompt-embedding table each sample used
    noise: torch.Tensor | None = None  # (N, S + 1, C, H, W): the rollout's noise, kept for train.ratio_norm


@dataclass(frozen=True)
class Guidance:
    """What turns UNet outputs into a DDIM step: shared by sampling and training."""

    eta: float
    guidance_scale: float
    prediction_type: str
    backend: str = "auto"
    autocast_bf16: bool = False  # run the UNet under bf16 autocast (fp32 master weights)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0


def configured_sampler(sample, models, device: torch.device, *, backend: str = "auto",
                       autocast_bf16: bool = False) -> tuple[DDIMSchedule, Guidance]:
    """The DDIM schedule and guidance that a SampleConfig asks of these models: training and evaluation alike."""
    return (DDIMSchedule.from_scheduler(models.scheduler, sample.num_steps, device),
            Guidance(sample.eta, sample.guidance_scale, models.prediction_type, backend, autocast_bf16))


def unet_outputs(unet, latents, timesteps, cond_embeds, uncond_embeds, guidance: Guidance):
    """(cond, uncond) fp32 UNet outputs; cond and uncond run in one batched call. uncond is None without CFG.

    latents (B, C, H, W), timesteps (B,), cond_embeds and uncond_embeds (B, L, D).
    """
    dtype = unet.dtype
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=guidance.autocast_bf16):
        if not guidance.uses_cfg:
            output = unet(latents.to(dtype), timesteps, encoder_hidden_states=cond_embeds.to(dtype)).sample
            return output.float(), None
        model_input = torch.cat([latents, latents]).to(dtype)                     # (2B, C, H, W)
        embeds = torch.cat([uncond_embeds, cond_embeds]).to(dtype)                # (2B, L, D)
        output = unet(model_input, torch.cat([timesteps, timesteps]), encoder_hidden_states=embeds).sample.float()
    uncond, cond = output.chunk(2)
    return cond, uncond


def draw_noise(seed: int, epoch: int, sample_ids: torch.Tensor, group_ids: torch.Tensor, num_steps: int,
               latent_shape: tuple[int, ...], *, same_noise_per_group: bool, device) -> torch.Tensor:
    """(B, S + 1, C, H, W) standard normal noise: [:, 0] the initial latent, [:, j + 1] step j's noise.

    Each sample's noise is a function of (seed, epoch, global sample id) only, so results do not depend on the
    batch size or on how samples are split across processes. With same_noise_per_group, the initial latent is a
    function of the group id instead.
    """
    if sample_ids.device.type != "cpu" or group_ids.device.type != "cpu":
        raise ValueError("draw_noise: sample_ids and group_ids must be CPU tensors (they seed host generators; "
                         "reading them from the GPU would stall the stream)")
    noise = torch.empty((len(sample_ids), num_steps + 1, *latent_shape), device=device)
    for row, (sample_id, group_id) in enumerate(zip(sample_ids.tolist(), group_ids.tolist())):
        gen = generator(seed, "noise", epoch, sample_id, device=device)
        noise[row] = torch.randn((num_steps + 1, *latent_shape), generator=gen, device=device)
        if same_noise_per_group:
            init = generator(seed, "initial-noise", epoch, group_id, device=device)
            noise[row, 0] = torch.randn(latent_shape, generator=init, device=device)
    return noise


def ddim_deterministic_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, *, uncond_output=None,
                            guidance_scale: float = 1.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """One DDIM step at eta = 0 (no noise, no log-prob): mean = coef_x * x_t + coef_e * guided, the step table's first
    two columns at eta = 0, in fp32. Tensors (B, C, H, W), alphas (B,). Equals diffusers' `DDIMScheduler.step(...,
    eta=0)`."""
    table = ops.reference.ddim_coefficients(alpha_prod_t.double(), alpha_prod_t_prev.double(), eta=0.0,
                                            prediction_type=prediction_type).float()
    guided = ops.reference.guided_output(model_output.float(), None if uncond_output is None else
                                         uncond_output.float(), guidance_scale)
    return table[:, 0].view(-1, 1, 1, 1) * sample.float() + table[:, 1].view(-1, 1, 1, 1) * guided


@torch.no_grad()
def denoise(unet, schedule: DDIMSchedule, noise, cond_embeds, uncond_embeds, guidance: Guidance,
            stochastic: tuple[bool, ...] | None = None):
    """Run the S DDIM steps for one batch. noise (B, S + 1, C, H, W); embeds (B, L, D). stochastic: which steps
    draw noise (eta = guidance.eta) and have a log-prob; the others are deterministic DDIM (eta = 0) with log-prob 0.
    None: every step is stochastic when guidance.eta > 0, none when it is 0.
    Returns latents (B, S + 1, C, H, W) and log_probs (B, S), fp32."""
    batch = noise.shape[0]
    if stochastic is None:
        stochastic = (guidance.eta > 0,) * schedule.num_steps
    latents = noise[:, 0]
    all_latents, all_log_probs = [latents], []
    for step in range(schedule.num_steps):
        timesteps = schedule.timesteps[step].expand(batch)
        cond, uncond = unet_outputs(unet, latents, timesteps, cond_embeds, uncond_embeds, guidance)
        alpha_t, alpha_prev = schedule.alpha_prod_t[step].expand(batch), schedule.alpha_prod_t_prev[step].expand(batch)
        if stochastic[step]:
            latents, log_prob = ops.ddim_step(
                cond, latents, alpha_t, alpha_prev, noise[:, step + 1], eta=guidance.eta, uncond_output=uncond,
                guidance_scale=guidance.guidance_scale, prediction_type=guidance.prediction_type,
                backend=guidance.backend)
        else:
            latents = ddim_deterministic_step(cond, latents, alpha_t, alpha_prev, uncond_output=uncond,
                                              guidance_scale=guidance.guidance_scale,
                                              prediction_type=guidance.prediction_type)
            log_prob = torch.zeros(batch, device=latents.device)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    return torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents (B, C, h, w) to fp32 images (B, 3, H, W) in [0, 1]."""
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return (images / 2 + 0.5).clamp(0, 1)


@dataclass(frozen=True)
class RolloutSettings:
    latent_shape: tuple[int, int, int]  # (C, H, W)
    group_size: int
    batch_size: int
    same_noise_per_group: bool
    seed: int
    keep_noise: bool = False  # keep each sample's noise in the trajectories (train.ratio_norm needs the step noise)


def sample_trajectories(unet, vae, schedule: DDIMSchedule, prompt_embeds, uncond_embed, sample_prompt, sample_ids,
                        guidance: Guidance, settings: RolloutSettings, epoch: int,
                        stochastic: tuple[bool, ...] | None = None) -> Trajectories:
    """Sample trajectories for the given samples in batches of settings.batch_size.

    prompt_embeds (U, L, D): one row per unique prompt; uncond_embed (1, L, D); sample_prompt (N,) long: each
    sample's row of prompt_embeds; sample_ids (N,) long, on the CPU: global sample ids (group = id // group_size),
    which key each sample's noise. stochastic: the steps that draw noise (see `denoise`); when some step is
    deterministic and some not (an SDE window), a group shares its initial noise, so its samples differ only by the
    window's noise.
    """
    device = prompt_embeds.device
    window = stochastic is not None and any(stochastic) and not all(stochastic)
    latents, log_probs, images, noises = [], [], [], []
    for start in range(0, sample_ids.shape[0], settings.batch_size):
        ids = sample_ids[start:start + settings.batch_size]
        noise = draw_noise(settings.seed, epoch, ids, ids // settings.group_size, schedule.num_steps,
                           settings.latent_shape, device=device,
                           same_noise_per_group=settings.same_noise_per_group or window)
        cond = prompt_embeds[sample_prompt[start:start + settings.batch_size]]
        batch_latents, batch_log_probs = denoise(unet, schedule, noise, cond, uncond_embed.expand_as(cond), guidance,
                                                 stochastic)
        latents.append(batch_latents)
        log_probs.append(batch_log_probs)
        images.append(decode_latents(vae, batch_latents[:, -1]))
        if settings.keep_noise:
            noises.append(noise)
    return Trajectories(torch.cat(latents), torch.cat(log_probs), torch.cat(images), sample_prompt,
                        torch.cat(noises) if settings.keep_noise else None)


def recompute_log_probs(unet, trajectories: Trajectories, prompt_embeds, uncond_embed, schedule: DDIMSchedule,
                        guidance: Guidance, samples: torch.Tensor, steps: torch.Tensor, *,
                        reference: Callable[[], ContextManager[torch.nn.Module]] | None = None,
                        ratio_norm: bool = False) -> tuple[torch.Tensor, ...]:
    """(log_probs (B,), kl (B,) or None) under `unet` for the stored transitions trajectories[samples[i]] at step
    steps[i].

    Same guided UNet call and the same op as sampling, so before any update the log-probs equal the stored ones.
    With `reference` (a factory of a context that yields the reference UNet, e.g. `lambda: nullcontext(ref_unet)`
    or the LoRA UNet with its adapters disabled), `kl` is the closed-form KL of the policy's Gaussian step from the
    reference's at the stored x_t: both share the DDIM std, so KL = mean over latent elements of
    (mean - mean_ref)^2 / (2 std^2) = log p_ref(mean_ref) - log p(mean_ref), computed with the same fused ops.
    Unlike a log-ratio estimate on the sampled x_{t-1}, it has no sampling noise, which at the late, small-std
    steps would dominate its gradient.

    With `ratio_norm` (GRPO-Guard's ratio normalisation; the trajectories must hold their noise) it returns
    (log_probs, kl, bias, std): std (B,) the step's noise std and bias (B,) = mean((mean - mean_old)^2) / (2 std^2),
    where mean_old = x_{t-1} - std * noise is the rollout's own mean: log p_old(mean_old) - log p(mean_old), computed
    with the same op and differentiable like the log-probs.
    """
    latents = trajectories.latents[samples, steps]                  # (B, C, H, W) x_t
    prev_latents = trajectories.latents[samples, steps + 1]         # (B, C, H, W) x_{t-1}
    cond_embeds = prompt_embeds[trajectories.prompt_index[samples]]  # (B, L, D)
    uncond_embeds = uncond_embed.expand_as(cond_embeds)
    timesteps, alpha_t, alpha_prev = schedule.timesteps[steps], schedule.alpha_prod_t[steps], \
        schedule.alpha_prod_t_prev[steps]
    step = dict(eta=guidance.eta, guidance_scale=guidance.guidance_scale, prediction_type=guidance.prediction_type,
                backend=guidance.backend)
    cond, uncond = unet_outputs(unet, latents, timesteps, cond_embeds, uncond_embeds, guidance)
    log_probs = ops.ddim_logprob(cond, latents, prev_latents, alpha_t, alpha_prev, uncond_output=uncond, **step)
    norm = ()
    if ratio_norm:
        if trajectories.noise is None:
            raise ValueError("recompute_log_probs: ratio_norm needs trajectories sampled with keep_noise")
        # the step table in float64, as the fused ops build it (fp32 loses the late steps' small std to cancellation)
        table = ops.reference.ddim_coefficients(alpha_t.double(), alpha_prev.double(), eta=guidance.eta,
                                                prediction_type=guidance.prediction_type).to(log_probs.dtype)
        std, log_norm = table[:, 2], table[:, 4]
        mean_old = prev_latents - std.view(-1, 1, 1, 1) * trajectories.noise[samples, steps + 1]
        norm = (log_norm - ops.ddim_logprob(cond, latents, mean_old, alpha_t, alpha_prev, uncond_output=uncond,
                                            **step), std)
    if reference is None:
        return log_probs, None, *norm
    with torch.no_grad(), reference() as ref_unet:
        ref_cond, ref_uncond = unet_outputs(ref_unet, latents, timesteps, cond_embeds, uncond_embeds, guidance)
        ref_mean, ref_at_mean = ops.ddim_step(ref_cond, latents, alpha_t, alpha_prev, torch.zeros_like(latents),
                                              uncond_output=ref_uncond, **step)
    kl = ref_at_mean - ops.ddim_logprob(cond, latents, ref_mean, alpha_t, alpha_prev, uncond_output=uncond, **step)
    return log_probs, kl, *norm


@dataclass(frozen=True)
class SdeWindow:
    """MixGRPO's SDE window: only `size` consecutive steps are stochastic (and trained); the rest are deterministic.

    schedule 'fixed': steps [start, start + size); 'random': the start drawn per epoch (uniform over the positions
    that fit); 'sliding': MixGRPO's progressive window, from `start` one step later every `shift_every` epochs, kept
    at the last position once it reaches the end of the trajectory."""

    size: int
    start: int = 0
    schedule: str = "fixed"
    shift_every: int = 10

    def first_step(self, epoch: int, num_steps: int, seed: int) -> int:
        last = num_steps - self.size
        if self.schedule == "fixed":
            return self.start
        if self.schedule == "random":
            return int(torch.randint(last + 1, (1,), generator=generator(seed, "sde-window", epoch)))
        return min(last, self.start + epoch // self.shift_every)

    def steps(self, epoch: int, num_steps: int, seed: int) -> tuple[bool, ...]:
        """(S,) which steps are stochastic in this epoch."""
        first = self.first_step(epoch, num_steps, seed)
        return tuple(first <= step < first + self.size for step in range(num_steps))
