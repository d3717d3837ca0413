"""Negative-aware fine-tuning (DiffusionNFT, arXiv 2509.16117), on AWM's (timestep, noise) draws.

Like `awm`, the sampler's steps are not trained: each sample's final latent is noised afresh K times
(train.matching_*). On each draw the rollout policy's prediction `old` is kept (computed before the first optimiser
step, on the plan's own micro-batches); the loss (`fastgrpo.ops.nft_loss`, one fused op) pulls the implicit positive
prediction beta * pred + (1 - beta) * old to the target for a good sample and the implicit negative (1 + beta) * old -
beta * pred for a bad one, mixed by r = the clipped advantage mapped to [0, 1], with the adaptive weight, in
clean-latent units (train.nft_weighting=x0, DiffusionNFT's) or the prediction's own (=prediction). Its optimum per
epoch lies within |target - old| / beta of the rollout policy, in either direction, where awm's negative advantages
raise the denoising loss without limit. The old policy is the rollout policy of each epoch (DiffusionNFT's decay 0,
read at NVlabs' scripts/train_nft_sd3.py, commit 619456a of the pkuhxy/DiffusionNFT copy); train.kl_coef adds
mean((pred - pred_ref)^2) to the base model as for awm.
"""

from __future__ import annotations

import torch

from fastgrpo import ops
from fastgrpo.grpo import UpdatePlan
from fastgrpo.objectives.awm import AdvantageWeightedMatching


class NegativeAwareFineTuning(AdvantageWeightedMatching):
    name = "nft"

    def loss_fn(self, s, samples, advantages: torch.Tensor, plan: UpdatePlan | None = None):
        """The NFT loss over (trajectory rows, draws); advantages (M,) by trajectory row. With `plan` the rollout
        policy's guided predictions on every draw are stored first (so the first optimiser step starts at
        prediction = old); without it the loss is on-policy (old = the prediction, detached)."""
        t = self.train
        draws, predictions, reference_for, trained = self.matching_inputs(s, samples)
        guidance = self._guidance(s)

        def guided(rows, units):
            cond, uncond, _, _ = predictions(s.unet, rows, units)
            return ops.reference.guided_output(cond, uncond, guidance.guidance_scale)

        old = None if plan is None else self.rollout_values(s, plan, draws, guided)

        def loss_fn(rows, units):
            cond, uncond, target, alpha_prod = predictions(s.unet, rows, units)
            if old is None:
                old_prediction = ops.reference.guided_output(cond, uncond, guidance.guidance_scale).detach()
            else:
                old_prediction = old[rows, units].to(cond.dtype)
            if t.nft_weighting == "x0":
                scale = ops.reference.x0_scale(alpha_prod, guidance.prediction_type)
            else:
                scale = torch.ones_like(alpha_prod)
            scale = scale * trained[rows, units]  # a penalty-only draw: c = 0, no error, no gradient of its own
            return ops.nft_loss(cond, target, old_prediction, advantages[rows], scale, beta=t.nft_beta,
                                adv_clip_max=t.adv_clip_max, uncond_prediction=uncond,
                                guidance_scale=guidance.guidance_scale,
                                reference_prediction=reference_for(rows, units, cond, uncond), kl_coef=t.kl_coef,
                                backend=t.ops_backend)

        return loss_fn
