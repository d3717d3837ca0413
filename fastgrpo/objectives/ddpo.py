"""The paper's objective: DDPO's clipped ratio of each trained sampler step's log-prob under the policy and under
the rollout, with group advantages (optionally a KL penalty to the base model, GRPO-Guard's ratio normalisation)."""

from __future__ import annotations

import contextlib

import torch

from fastgrpo.diffusion import recompute_log_probs
from fastgrpo.grpo import LossSettings, UpdatePlan, ddpo_loss_fn, plan_update
from fastgrpo.lora import adapters_disabled, has_lora


def kl_reference(s):
    """A factory of a context that yields the KL reference (the base UNet), or None without a KL penalty."""
    if s.ref_unet is not None:
        return lambda: contextlib.nullcontext(s.ref_unet)
    if has_lora(s.unet) and s.config.train.kl_coef > 0:
        return lambda: adapters_disabled(s.unet)
    return None


class DDPO:
    name = "ddpo"
    needs_log_probs = True

    def __init__(self, config):
        self.train = config.train
        self.num_steps = config.sample.num_steps
        window = config.sample.sde_window_size
        self.units_per_sample = max(1, round((window or self.num_steps) * self.train.timestep_fraction))

    def plan(self, samples: torch.Tensor, gen: torch.Generator, window: tuple[int, int] | None) -> UpdatePlan:
        """Each sample's trained steps: a random subset of the eligible ones (the SDE window's, when set)."""
        return plan_update(samples, self.num_steps, self.train.timestep_fraction, gen,
                           tuple(self.train.timestep_range), step_window=window)

    def loss_fn(self, s, samples, advantages: torch.Tensor, plan: UpdatePlan | None = None):
        """The clipped-ratio loss over (trajectory rows, trained steps); advantages (M,) by trajectory row."""
        t, batch, trajectories = self.train, samples.batch, samples.trajectories

        def log_probs_under(unet, reference=None, ratio_norm=False):
            return lambda rows, steps: recompute_log_probs(unet, trajectories, batch.prompt_embeds, s.uncond_embed,
                                                           s.schedule, s.guidance, rows, steps, reference=reference,
                                                           ratio_norm=ratio_norm)

        reference = kl_reference(s)
        policy_fn, ref_fn = log_probs_under(s.unet, ratio_norm=t.ratio_norm), None
        if reference is not None and t.kl_estimator == "mean":
            policy_fn = log_probs_under(s.unet, reference, ratio_norm=t.ratio_norm)
            covered = s.levers.kl_covers(samples.rows(batch.is_unsafe))
            if not bool(covered.all()):  # the KL of the rows the penalty does not cover is zeroed (and its gradient)
                weight, full_fn = covered.float(), policy_fn

                def policy_fn(rows, steps):
                    log_probs, kl, *norm = full_fn(rows, steps)
                    return log_probs, kl * weight[rows], *norm
        elif reference is not None:
            def ref_fn(rows, steps):
                with reference() as ref_unet:
                    return log_probs_under(ref_unet)(rows, steps)[0]
        return ddpo_loss_fn(policy_fn, ref_fn, trajectories.log_probs, advantages,
                            LossSettings(t.clip_range, t.kl_coef, t.ops_backend, clip_range_high=t.clip_range_high))
