"""Pure-PyTorch reference math for the diffusion-GRPO ops.

This is the single source of truth: every faster backend is tested against these functions, and these functions are
tested against closed-form float64 math, `torch.distributions.Normal` and diffusers' `DDIMScheduler`.

Conventions
- Math runs in float32, or float64 when any floating input is float64 (so `gradcheck` works).
- Per-sample log-probs reduce over every non-batch dim with the *mean* (DDPO / flow_grpo convention); `sum` optional.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
PREDICTION_TYPES = ("epsilon", "v_prediction")
REDUCTIONS = ("mean", "sum")


def math_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def guided_output(model_output, uncond_output, guidance_scale: float):
    """Classifier-free guidance: uncond + g * (cond - uncond); the conditional output alone when uncond is None."""
    if uncond_output is None:
        return model_output
    return uncond_output + guidance_scale * (model_output - uncond_output)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def ddim_moments(model_output, sample, alpha_prod_t, alpha_prod_t_prev, *, eta: float, prediction_type: str):
    """Mean and std of the stochastic DDIM transition p(x_{t-1} | x_t) (DDIM paper eq. 12 and 16).

    model_output, sample: (B, ...) in the math dtype; alpha_prod_t, alpha_prod_t_prev: (B,).
    Returns mean (B, ...) and std (B, 1, ...).
    """
    alpha_t = _per_sample(alpha_prod_t, sample)
    alpha_prev = _per_sample(alpha_prod_t_prev, sample)
    beta_t = 1.0 - alpha_t
    if prediction_type == "epsilon":
        pred_x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        pred_epsilon = model_output
    elif prediction_type == "v_prediction":
        pred_x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        pred_epsilon = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    direction = (1.0 - alpha_prev - std**2).sqrt() * pred_epsilon
    mean = alpha_prev.sqrt() * pred_x0 + direction
    return mean, std


def gaussian_logprob(value, mean, std, *, reduction: str):
    """Per-sample log N(value; mean, std^2), reduced over all non-batch dims. (B, ...) -> (B,)."""
    elementwise = -((value - mean) ** 2) / (2.0 * std**2) - torch.log(std) - LOG_SQRT_2PI
    flat = elementwise.reshape(elementwise.shape[0], -1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "sum":
        return flat.sum(dim=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _cast(dtype, *tensors):
    return [None if t is None else t.to(dtype) for t in tensors]


def ddim_logprob(model_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev, *, eta=1.0, uncond_output=None,
                 guidance_scale=1.0, prediction_type="epsilon", reduction="mean"):
    """log p(prev_sample | sample) under stochastic DDIM with CFG folded in. Returns (B,) in the math dtype."""
    dtype = math_dtype(model_output, sample, prev_sample, uncond_output)
    model_output, uncond_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev = _cast(
        dtype, model_output, uncond_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev)
    guided = guided_output(model_output, uncond_output, guidance_scale)
    mean, std = ddim_moments(guided, sample, alpha_prod_t, alpha_prod_t_prev, eta=eta, prediction_type=prediction_type)
    return gaussian_logprob(prev_sample, mean, std, reduction=reduction)


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, *, eta=1.0, uncond_output=None,
              guidance_scale=1.0, prediction_type="epsilon", reduction="mean"):
    """Sample x_{t-1} = mean + std * noise and return (prev_sample, log_prob), both in the math dtype.

    The log-prob is computed from the returned (rounded) prev_sample, exactly as `ddim_logprob` would recompute it.
    """
    dtype = math_dtype(model_output, sample, noise, uncond_output)
    model_output, uncond_output, sample, noise, alpha_prod_t, alpha_prod_t_prev = _cast(
        dtype, model_output, uncond_output, sample, noise, alpha_prod_t, alpha_prod_t_prev)
    guided = guided_output(model_output, uncond_output, guidance_scale)
    mean, std = ddim_moments(guided, sample, alpha_prod_t, alpha_prod_t_prev, eta=eta, prediction_type=prediction_type)
    prev_sample = mean + std * noise
    return prev_sample, gaussian_logprob(prev_sample, mean, std, reduction=reduction)


def group_advantages(rewards, group_size, *, std="group", clip=None, eps=1e-8, unbiased=True):
    """Normalise rewards within groups: (r - mean_group) / (std + eps), then clip to [-clip, clip].

    rewards: (N,). group_size: an int (consecutive groups of that size) or a (N,) integer tensor of group ids.
    std: "group" uses each group's std, "global" the std over all N rewards. `unbiased` picks the sample std
    (torch's default) over the population std. A group of identical rewards gets advantage 0.
    """
    dtype = math_dtype(rewards)
    rewards = rewards.to(dtype)
    group_ids = _group_ids(rewards, group_size)
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    counts = torch.zeros(num_groups, dtype=dtype, device=rewards.device).index_add_(
        0, group_ids, torch.ones_like(rewards))
    # Measured from each group's first reward, so a group of equal rewards centres to exactly 0 (a mean summed in
    # floating point can be an ulp off, which divided by std + eps would give every sample a large advantage).
    positions = torch.arange(rewards.shape[0], device=rewards.device)
    first = torch.full((num_groups,), rewards.shape[0], device=rewards.device).scatter_reduce_(
        0, group_ids, positions, "amin")
    shifted = rewards - rewards[first][group_ids]
    sums = torch.zeros(num_groups, dtype=dtype, device=rewards.device).index_add_(0, group_ids, shifted)
    centered = shifted - (sums / counts)[group_ids]
    if std == "group":
        squares = torch.zeros(num_groups, dtype=dtype, device=rewards.device).index_add_(0, group_ids, centered**2)
        denominator = (counts - 1.0) if unbiased else counts
        scale = (squares / denominator.clamp_min(1.0)).sqrt()[group_ids]
    elif std == "global":
        scale = rewards.std(unbiased=unbiased) if rewards.numel() > 1 else torch.zeros((), dtype=dtype)
    else:
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    advantages = centered / (scale + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages


def _group_ids(rewards, group_size):
    if isinstance(group_size, torch.Tensor):
        return group_size.to(device=rewards.device, dtype=torch.long)
    return torch.arange(rewards.shape[0], device=rewards.device) // int(group_size)


def grpo_loss(log_probs, old_log_probs, advantages, *, clip_range, ref_log_probs=None, kl_coef=0.0,
              clip_range_high=None):
    """PPO clipped-ratio loss (mean over the M entries) plus an optional KL-to-reference penalty.

    The ratio is clipped to [1 - clip_range, 1 + clip_range_high] (clip_range_high None: clip_range, the symmetric
    PPO clip; a larger clip_range_high is DAPO's "clip higher", which lets low-probability actions grow further).

    log_probs, old_log_probs, advantages, ref_log_probs: (M,). The KL term uses the k3 estimator
    `exp(ref - logp) - (ref - logp) - 1` (non-negative, unbiased for KL(policy || reference) under policy samples).
    Returns (loss, stats): stats are detached 0-dim tensors `approx_kl` (0.5 * mean((logp - old)^2)), `clipfrac`
    (fraction of ratios outside the clip interval), `ratio_mean`, `ratio_min`, `ratio_max`, and `kl` when a reference is given.
    """
    dtype = math_dtype(log_probs, old_log_probs, advantages, ref_log_probs)
    log_probs, old_log_probs, advantages, ref_log_probs = _cast(
        dtype, log_probs, old_log_probs, advantages, ref_log_probs)
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    low, high = 1.0 - clip_range, 1.0 + (clip_range if clip_range_high is None else clip_range_high)
    clipped = -advantages * torch.clamp(ratio, low, high)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() < low) | (ratio.detach() > high)).to(dtype).mean(),
        "ratio_mean": ratio.detach().mean(),
        "ratio_min": ratio.detach().min(),
        "ratio_max": ratio.detach().max(),
    }
    if ref_log_probs is not None:
        delta = ref_log_probs - log_probs
        kl = (torch.exp(delta) - delta - 1.0).mean()
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats
