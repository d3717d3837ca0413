"""Advantage-weighted matching (AWM, arXiv 2509.25050), carried to DDIM's epsilon and v prediction.

The sampler's steps are not trained. Each sample's final latent x0 is noised afresh K times,
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alpha_bar(t), and each (t, eps) draw is a trained row whose
surrogate s = -mean((pred(x_t, t) - target)^2) (target eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) x0) is the
denoising loss pretraining minimises. The update is the PPO clip on ratio exp(s - s_old), with s_old the rollout
policy's surrogate on the same draw, weighted by the sample's group advantage (`fastgrpo.ops.matching_loss`, one fused
op). So good samples are denoised better and bad ones worse, without any step's log-prob: the rollout may be
deterministic (sample.eta = 0). The optional penalty is train.kl_coef * mean((pred - pred_ref)^2) to the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgrpo import ops
from fastgrpo.diffusion import Guidance, unet_outputs
from fastgrpo.errors import ConfigError
from fastgrpo.grpo import UpdatePlan, micro_batches, plan_update
from fastgrpo.objectives.ddpo import kl_reference
from fastgrpo.rng import generator


@dataclass
class MatchingDraws:
    """Each trajectory row's K (timestep, noise) draws."""

    timesteps: torch.Tensor  # (M, K) long: training timesteps in [0, T)
    noise: torch.Tensor      # (M, K, C, H, W) fp32 standard normal


def matching_timestep_bounds(timestep_range: tuple[float, float], num_train_timesteps: int) -> tuple[int, int]:
    """The training timesteps [low, high) of the part [start, end] of the trajectory (0 = its noisiest end, 1 = the
    clean image): t in [round(T (1 - end)), round(T (1 - start)))."""
    start, end = timestep_range
    low, high = round(num_train_timesteps * (1.0 - end)), round(num_train_timesteps * (1.0 - start))
    if high <= low:
        raise ConfigError(f"train.timestep_range {list(timestep_range)} holds none of the {num_train_timesteps} "
                          "training timesteps")
    return low, high


def draw_matching(keys: torch.Tensor, num_draws: int, distribution: str, schedule_timesteps: torch.Tensor,
                  num_train_timesteps: int, latent_shape: tuple[int, ...], seed: int, epoch: int,
                  device, timestep_range: tuple[float, float] = (0.0, 1.0)) -> MatchingDraws:
    """K draws per row, a function of (seed, epoch, the row's key) only (so of no batch size or world size); the key
    is the global sample id, or its group (train.matching_noise=group), and rows with one key get the same draws.

    distribution 'uniform': t uniform over [low, high); 'stratified': draw k uniform over the k-th of K equal parts
    of it; 'sampler': K distinct steps of the sampler's schedule (schedule_timesteps (S,), noisiest first) among its
    steps [round(S start), round(S end)). [low, high) = `matching_timestep_bounds(timestep_range, T)`: the whole
    [0, T) for the default range (0, 1)."""
    low, high = matching_timestep_bounds(timestep_range, num_train_timesteps)
    steps = schedule_timesteps.shape[0]
    eligible = schedule_timesteps.cpu()[round(steps * timestep_range[0]):round(steps * timestep_range[1])]
    if distribution == "sampler" and eligible.shape[0] < num_draws:
        raise ConfigError(f"train.timestep_range {list(timestep_range)} holds {eligible.shape[0]} of the sampler's "
                          f"{steps} steps: fewer than train.matching_draws ({num_draws})")
    timesteps, noise = [], []
    for key in keys.tolist():
        gen = generator(seed, "matching", epoch, key)
        if distribution == "uniform":
            drawn = low + torch.randint(high - low, (num_draws,), generator=gen)
        elif distribution == "stratified":
            offsets = torch.rand(num_draws, generator=gen, dtype=torch.float64)
            drawn = low + ((torch.arange(num_draws) + offsets) * (high - low) / num_draws).long()
        else:
            choice = torch.randperm(eligible.shape[0], generator=gen)[:num_draws]
            drawn = eligible[choice]
        timesteps.append(drawn)
        noise.append(torch.randn((num_draws, *latent_shape), generator=gen))
    return MatchingDraws(torch.stack(timesteps).to(device), torch.stack(noise).to(device))


def noised_inputs(clean: torch.Tensor, noise: torch.Tensor, alpha_prod: torch.Tensor, prediction_type: str):
    """(x_t, target) for clean latents x0 (B, C, H, W), noise (B, C, H, W), alpha_bar(t) (B,): x_t = sqrt(a) x0 +
    sqrt(1 - a) eps; target eps (epsilon prediction) or v = sqrt(a) eps - sqrt(1 - a) x0 (v prediction)."""
    a = alpha_prod.view(-1, *(1,) * (clean.dim() - 1))
    signal, sigma = a.sqrt(), (1.0 - a).sqrt()
    noisy = signal * clean + sigma * noise
    target = noise if prediction_type == "epsilon" else signal * noise - sigma * clean
    return noisy, target


class AdvantageWeightedMatching:
    name = "awm"
    needs_log_probs = False

    def __init__(self, config):
        self.config = config
        self.train = config.train
        self.units_per_sample = config.train.matching_draws

    def plan(self, samples: torch.Tensor, gen: torch.Generator, window: tuple[int, int] | None) -> UpdatePlan:
        """Every sample trains all its K draws (in a random order); the SDE window only shapes the rollout."""
        return plan_update(samples, self.units_per_sample, 1.0, gen)

    def _guidance(self, s) -> Guidance:
        if self.train.matching_prediction == "guided":
            return s.guidance
        return Guidance(s.guidance.eta, 1.0, s.guidance.prediction_type, s.guidance.backend,
                        s.guidance.autocast_bf16)

    def matching_inputs(self, s, samples):
        """(draws, predictions, reference_for, trained): the epoch's draws; predictions(unet, rows, units) -> (cond,
        uncond or None, target, alpha_bar(t)) on those draws; reference_for(rows, units, cond, uncond) -> the
        penalty's reference prediction (None without a penalty; a draw the penalty does not cover gets its own
        detached prediction, so no penalty and no gradient); trained (M, K) bool: the draws inside
        train.timestep_range, which carry the advantage (the others, drawn for train.kl_timestep_range, only the
        penalty)."""
        t, batch, trajectories = self.train, samples.batch, samples.trajectories
        alphas = s.models.scheduler.alphas_cumprod.to(device=s.device, dtype=torch.float32)        # (T,)
        keys = samples.sample_ids.cpu()
        if t.matching_noise == "group":
            keys = keys // self.config.sample.group_size
        trained_range = tuple(t.timestep_range)
        penalised_range = tuple(t.kl_timestep_range or t.timestep_range)
        hull = (min(trained_range[0], penalised_range[0]), max(trained_range[1], penalised_range[1]))
        draws = draw_matching(keys, t.matching_draws, t.matching_timesteps,
                              s.schedule.timesteps, alphas.shape[0], tuple(trajectories.latents.shape[2:]),
                              self.config.run.seed, samples.epoch, s.device, hull)

        def inside(part):
            low, high = matching_timestep_bounds(part, alphas.shape[0])
            return (draws.timesteps >= low) & (draws.timesteps < high)                                 # (M, K)

        trained, penalised = inside(trained_range), inside(penalised_range)
        guidance, clean = self._guidance(s), trajectories.latents[:, -1]
        reference = kl_reference(s)
        covered = s.levers.kl_covers(samples.rows(batch.is_unsafe))[:, None] & penalised                  # (M, K)
        everywhere, anywhere = bool(covered.all()), bool(covered.any())  # read once per epoch, not per micro-batch

        def predictions(unet, rows, units):
            timesteps = draws.timesteps[rows, units]
            noisy, target = noised_inputs(clean[rows], draws.noise[rows, units], alphas[timesteps],
                                          guidance.prediction_type)
            cond_embeds = batch.prompt_embeds[trajectories.prompt_index[rows]]
            cond, uncond = unet_outputs(unet, noisy, timesteps, cond_embeds, s.uncond_embed.expand_as(cond_embeds),
                                        guidance)
            return cond, uncond, target, alphas[timesteps]

        def reference_for(rows, units, cond, uncond):
            if reference is None or t.kl_coef <= 0:
                return None
            if not anywhere:  # nothing this epoch is penalised: the own prediction, no reference pass
                return ops.reference.guided_output(cond, uncond, guidance.guidance_scale).detach()
            with torch.no_grad(), reference() as ref_unet:
                ref_cond, ref_uncond, _, _ = predictions(ref_unet, rows, units)
                ref = ops.reference.guided_output(ref_cond, ref_uncond, guidance.guidance_scale)
            if not everywhere:
                guided = ops.reference.guided_output(cond, uncond, guidance.guidance_scale).detach()
                ref = torch.where(covered[rows, units].view(-1, *(1,) * (ref.dim() - 1)), ref, guided)
            return ref

        return draws, predictions, reference_for, trained

    def rollout_values(self, s, plan, draws, compute):
        """compute(rows, units) -> (rows, ...) under the rollout policy (no grad) for every (row, draw) of this rank's
        plan, on the plan's own micro-batches, as a tensor (M, K, ...)."""
        t, values = self.train, None
        with torch.no_grad():
            for step in micro_batches(plan, batch_size=t.batch_size,
                                      samples_per_step=t.samples_per_step // s.engine.world_size):
                for rows, k in step:
                    order, units = plan.order[rows], plan.steps[rows, k]
                    value = compute(order, units)
                    if values is None:
                        values = value.new_empty((*draws.timesteps.shape, *value.shape[1:]))
                    values[order, units] = value
        return values

    def loss_fn(self, s, samples, advantages: torch.Tensor, plan: UpdatePlan | None = None):
        """The clipped matching loss over (trajectory rows, draws); advantages (M,) by trajectory row. With `plan`
        (this rank's first inner-epoch plan) the rollout policy's surrogates are computed first, on the plan's own
        micro-batches, so the first optimiser step's ratio is exactly 1; without it the loss is on-policy."""
        t = self.train
        draws, predictions, reference_for, trained = self.matching_inputs(s, samples)
        guidance_scale = self._guidance(s).guidance_scale

        def matching(rows, units, old, penalised=True):
            cond, uncond, target, _ = predictions(s.unet, rows, units)
            weights = advantages[rows] * trained[rows, units]           # a penalty-only draw has no advantage
            return ops.matching_loss(cond, target, weights, old_surrogates=old, clip_range=t.clip_range,
                                     clip_range_high=t.clip_range_high, uncond_prediction=uncond,
                                     guidance_scale=guidance_scale,
                                     reference_prediction=reference_for(rows, units, cond, uncond) if penalised
                                     else None, kl_coef=t.kl_coef, backend=t.ops_backend)

        old = None
        if plan is not None:  # the surrogates do not depend on the penalty: no reference pass for them
            old = self.rollout_values(s, plan, draws, lambda rows, units: matching(rows, units, None, False)[2])

        def loss_fn(rows, units):
            loss, stats, _ = matching(rows, units, None if old is None else old[rows, units])
            return loss, stats

        return loss_fn
