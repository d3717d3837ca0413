"""Pure-PyTorch reference math for the diffusion-GRPO ops.

This is the single source of truth: every faster backend is tested against these functions, and these functions are
tested against closed-form float64 math, `torch.distributions.Normal` and diffusers' `DDIMScheduler`. The samplers'
step formulas (DDIM, the flow-matching SDE) are written once, here, as per-sample coefficient tables that every
backend consumes (see "sampler step coefficients").

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


# ---------------------------------------------------------------------------------------- sampler step coefficients
#
# Every sampler step these ops support is a Gaussian transition with a mean affine in x_t and the (guided) model
# output. Per sample, five numbers describe it completely:
#
#     mean      = coef_x * x_t + coef_e * guided
#     x_{t-1}   = mean + noise_std * noise                           (sampling)
#     log p     = reduce(-precision * (x_{t-1} - mean)^2 + log_norm)  (elementwise, then mean or sum)
#
# A true Gaussian has precision = 1 / (2 noise_std^2) and log_norm = -(log noise_std + log sqrt(2 pi)); flow_grpo's
# "cps" step drops the constants and keeps -(x_{t-1} - mean)^2 (precision 1, log_norm 0). The functions below are
# the only place the samplers' formulas are written: the reference applies the table, and the fused backends
# (Triton, C++) receive it as a (B, 5) float64 tensor computed here, so every backend uses these exact formulas.

COEFFICIENTS = ("coef_x", "coef_e", "noise_std", "precision", "log_norm")
SDE_TYPES = ("sde", "cps")


def _gaussian_table(coef_x, coef_e, std) -> torch.Tensor:
    return torch.stack([coef_x, coef_e, std, 0.5 / std**2, -(torch.log(std) + LOG_SQRT_2PI)], dim=1)


def ddim_coefficients(alpha_prod_t, alpha_prod_t_prev, *, eta: float, prediction_type: str) -> torch.Tensor:
    """(B, 5) step table (`COEFFICIENTS`) of the stochastic DDIM step (DDIM paper eq. 12 and 16), in the alphas'
    dtype: sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)), and
    mean = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma_t^2) * pred_epsilon, written as coef_x * x_t +
    coef_e * model_output for epsilon or v prediction."""
    alpha_t, alpha_prev = alpha_prod_t, alpha_prod_t_prev
    beta_t = 1.0 - alpha_t
    std = eta * ((1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev)).sqrt()
    direction = (1.0 - alpha_prev - std**2).sqrt()
    sqrt_t, sqrt_prev, sqrt_beta = alpha_t.sqrt(), alpha_prev.sqrt(), beta_t.sqrt()
    if prediction_type == "epsilon":      # pred_x0 = (x - sqrt(b) e) / sqrt(a), pred_eps = e
        coef_x = sqrt_prev / sqrt_t
        coef_e = direction - sqrt_prev * sqrt_beta / sqrt_t
    elif prediction_type == "v_prediction":  # pred_x0 = sqrt(a) x - sqrt(b) v, pred_eps = sqrt(a) v + sqrt(b) x
        coef_x = sqrt_prev * sqrt_t + direction * sqrt_beta
        coef_e = direction * sqrt_t - sqrt_prev * sqrt_beta
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return _gaussian_table(coef_x, coef_e, std)


def flow_sde_coefficients(sigma, sigma_prev, *, noise_level: float, sde_type: str = "sde",
                          sigma_max: float | None = None) -> torch.Tensor:
    """(B, 5) step table of flow_grpo's flow-matching SDE step from sigma to sigma_prev (< sigma) for a velocity
    model v (x_t = (1 - sigma) x_0 + sigma * noise), in the sigmas' dtype. With dt = sigma_prev - sigma:

    - "sde": std_t = noise_level * sqrt(sigma / (1 - s)) with s = sigma_max where sigma == 1, else sigma;
      mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt; noise_std =
      std_t sqrt(-dt); a Gaussian log-prob.
    - "cps" (coefficients-preserving sampling): std_t = sigma_prev sin(noise_level pi / 2);
      mean = (x - sigma v)(1 - sigma_prev) + (x + (1 - sigma) v) sqrt(sigma_prev^2 - std_t^2); noise_std = std_t;
      log p = -(x_{t-1} - mean)^2 without constants (precision 1, log_norm 0), as flow_grpo computes it.
    """
    dt = sigma_prev - sigma
    if sde_type == "sde":
        if sigma_max is None:
            raise ValueError("sde_type 'sde' needs sigma_max (the value that replaces sigma == 1; flow_grpo uses "
                             "scheduler.sigmas[1])")
        safe = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
        std_t = (sigma / (1.0 - safe)).sqrt() * noise_level
        coef_x = 1.0 + std_t**2 / (2.0 * sigma) * dt
        coef_e = (1.0 + std_t**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
        return _gaussian_table(coef_x, coef_e, std_t * (-dt).sqrt())
    if sde_type == "cps":
        std_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        keep = (sigma_prev**2 - std_t**2).sqrt()
        coef_x = (1.0 - sigma_prev) + keep
        coef_e = -sigma * (1.0 - sigma_prev) + (1.0 - sigma) * keep
        return torch.stack([coef_x, coef_e, std_t, torch.ones_like(std_t), torch.zeros_like(std_t)], dim=1)
    raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")


def step_moments(model_output, sample, coefficients):
    """(mean (B, ...), noise_std (B, 1, ...)) of a step from its (B, 5) table; model_output already guided."""
    coef_x, coef_e, std = (_per_sample(coefficients[:, k], sample) for k in range(3))
    return coef_x * sample + coef_e * model_output, std


def step_logprob(model_output, sample, prev_sample, coefficients, *, uncond_output=None, guidance_scale=1.0,
                 reduction="mean"):
    """log p(prev_sample | sample) of the step a (B, 5) table describes, CFG folded in. Returns (B,) in the math
    dtype (the table is cast to it)."""
    dtype = math_dtype(model_output, sample, prev_sample, uncond_output)
    model_output, uncond_output, sample, prev_sample, coefficients = _cast(
        dtype, model_output, uncond_output, sample, prev_sample, coefficients)
    mean, _ = step_moments(guided_output(model_output, uncond_output, guidance_scale), sample, coefficients)
    return _reduce(_elementwise_logprob(prev_sample, mean, coefficients), reduction)


def step_sample(model_output, sample, noise, coefficients, *, uncond_output=None, guidance_scale=1.0,
                reduction="mean"):
    """x_{t-1} = mean + noise_std * noise and its log-prob (computed from the returned, rounded x_{t-1})."""
    dtype = math_dtype(model_output, sample, noise, uncond_output)
    model_output, uncond_output, sample, noise, coefficients = _cast(
        dtype, model_output, uncond_output, sample, noise, coefficients)
    mean, std = step_moments(guided_output(model_output, uncond_output, guidance_scale), sample, coefficients)
    prev_sample = mean + std * noise
    return prev_sample, _reduce(_elementwise_logprob(prev_sample, mean, coefficients), reduction)


def _elementwise_logprob(value, mean, coefficients):
    precision, log_norm = _per_sample(coefficients[:, 3], value), _per_sample(coefficients[:, 4], value)
    return -precision * (value - mean) ** 2 + log_norm


def _reduce(elementwise, reduction):
    flat = elementwise.reshape(elementwise.shape[0], -1)
    if reduction == "mean":
        return flat.mean(dim=1)
    if reduction == "sum":
        return flat.sum(dim=1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def gaussian_logprob(value, mean, std, *, reduction: str):
    """Per-sample log N(value; mean, std^2), reduced over all non-batch dims. (B, ...) -> (B,)."""
    return _reduce(-((value - mean) ** 2) / (2.0 * std**2) - torch.log(std) - LOG_SQRT_2PI, reduction)


def _cast(dtype, *tensors):
    return [None if t is None else t.to(dtype) for t in tensors]


def ddim_logprob(model_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev, *, eta=1.0, uncond_output=None,
                 guidance_scale=1.0, prediction_type="epsilon", reduction="mean"):
    """log p(prev_sample | sample) under stochastic DDIM with CFG folded in. Returns (B,) in the math dtype."""
    dtype = math_dtype(model_output, sample, prev_sample, uncond_output)
    table = ddim_coefficients(alpha_prod_t.to(dtype), alpha_prod_t_prev.to(dtype), eta=eta,
                              prediction_type=prediction_type)
    return step_logprob(model_output, sample, prev_sample, table, uncond_output=uncond_output,
                        guidance_scale=guidance_scale, reduction=reduction)


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, *, eta=1.0, uncond_output=None,
              guidance_scale=1.0, prediction_type="epsilon", reduction="mean"):
    """Sample x_{t-1} = mean + std * noise and return (prev_sample, log_prob), both in the math dtype.

    The log-prob is computed from the returned (rounded) prev_sample, exactly as `ddim_logprob` would recompute it.
    """
    dtype = math_dtype(model_output, sample, noise, uncond_output)
    table = ddim_coefficients(alpha_prod_t.to(dtype), alpha_prod_t_prev.to(dtype), eta=eta,
                              prediction_type=prediction_type)
    return step_sample(model_output, sample, noise, table, uncond_output=uncond_output,
                       guidance_scale=guidance_scale, reduction=reduction)


def flow_sde_logprob(model_output, sample, prev_sample, sigma, sigma_prev, *, noise_level=0.7, sde_type="sde",
                     sigma_max=None, uncond_output=None, guidance_scale=1.0, reduction="mean"):
    """log p(prev_sample | sample) of flow_grpo's SDE step (`flow_sde_coefficients`), CFG folded in; (B,)."""
    dtype = math_dtype(model_output, sample, prev_sample, uncond_output)
    table = flow_sde_coefficients(sigma.to(dtype), sigma_prev.to(dtype), noise_level=noise_level, sde_type=sde_type,
                                  sigma_max=sigma_max)
    return step_logprob(model_output, sample, prev_sample, table, uncond_output=uncond_output,
                        guidance_scale=guidance_scale, reduction=reduction)


def flow_sde_step(model_output, sample, sigma, sigma_prev, noise, *, noise_level=0.7, sde_type="sde", sigma_max=None,
                  uncond_output=None, guidance_scale=1.0, reduction="mean"):
    """Sample flow_grpo's SDE step with the given standard-normal noise: (prev_sample, log_prob)."""
    dtype = math_dtype(model_output, sample, noise, uncond_output)
    table = flow_sde_coefficients(sigma.to(dtype), sigma_prev.to(dtype), noise_level=noise_level, sde_type=sde_type,
                                  sigma_max=sigma_max)
    return step_sample(model_output, sample, noise, table, uncond_output=uncond_output,
                       guidance_scale=guidance_scale, reduction=reduction)


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


def _ratio_stats(log_ratio, ratio, low, high) -> dict[str, torch.Tensor]:
    """Detached statistics of a clipped ratio: approx_kl (0.5 mean(log_ratio^2)), clipfrac (outside [low, high]),
    ratio_mean, ratio_min, ratio_max."""
    log_ratio, ratio = log_ratio.detach(), ratio.detach()
    outside = (ratio < low) | (ratio > high)
    return {"approx_kl": 0.5 * (log_ratio ** 2).mean(), "clipfrac": outside.to(ratio.dtype).mean(),
            "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max()}


def grpo_loss(log_probs, old_log_probs, advantages, *, clip_range, ref_log_probs=None, kl_coef=0.0,
              clip_range_high=None, ratio_bias=None, ratio_scale=None, weights=None):
    """PPO clipped-ratio loss (mean over the M entries) plus an optional KL-to-reference penalty.

    The ratio is clipped to [1 - clip_range, 1 + clip_range_high] (clip_range_high None: clip_range, the symmetric
    PPO clip; a larger clip_range_high is DAPO's "clip higher", which lets low-probability actions grow further).

    Ratio normalisation (GRPO-Guard's RatioNorm; ratio_bias and ratio_scale (M,) together): the log-ratio becomes
    (log_probs - old_log_probs + ratio_bias) * ratio_scale. With ratio_bias = mean((mu - mu_old)^2) / (2 std^2), the
    squared drift of the step's mean that pulls the ratio's mean below 1, and ratio_scale = std (the step's noise
    std), the log-ratio is the drift's projection on the sampled noise, on one scale at every step. ratio_bias is
    differentiable. weights (M,): each entry's clipped term is multiplied by its weight before the mean (GRPO-Guard's
    per-step gradient reweighting, e.g. 1 / (-dt) for the flow SDE).

    log_probs, old_log_probs, advantages, ref_log_probs: (M,). The KL term uses the k3 estimator
    `exp(ref - logp) - (ref - logp) - 1` (non-negative, unbiased for KL(policy || reference) under policy samples).
    Returns (loss, stats): stats are detached 0-dim tensors `approx_kl` (0.5 * mean((logp - old)^2)), `clipfrac`
    (fraction of ratios outside the clip interval), `ratio_mean`, `ratio_min`, `ratio_max`, and `kl` when a reference is given.
    """
    if (ratio_bias is None) != (ratio_scale is None):
        raise ValueError("ratio_bias and ratio_scale come together (GRPO-Guard's RatioNorm)")
    dtype = math_dtype(log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights)
    log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights = _cast(
        dtype, log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights)
    log_ratio = log_probs - old_log_probs
    if ratio_scale is not None:
        log_ratio = (log_ratio + ratio_bias) * ratio_scale
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    low, high = 1.0 - clip_range, 1.0 + (clip_range if clip_range_high is None else clip_range_high)
    clipped = -advantages * torch.clamp(ratio, low, high)
    terms = torch.maximum(unclipped, clipped)
    loss = (terms if weights is None else terms * weights).mean()
    stats = _ratio_stats(log_ratio, ratio, low, high)
    if ref_log_probs is not None:
        delta = ref_log_probs - log_probs
        kl = (torch.exp(delta) - delta - 1.0).mean()
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats


# ---------------------------------------------------------------------------------------- advantage-weighted matching

MATCHING_STATS = ("loss", "approx_kl", "clipfrac", "ratio_mean", "ratio_min", "ratio_max", "kl")


def matching_loss(prediction, target, advantages, *, clip_range, old_surrogates=None, clip_range_high=None,
                  uncond_prediction=None, guidance_scale=1.0, reference_prediction=None, kl_coef=0.0):
    """Advantage-weighted matching loss (AWM, arXiv 2509.25050) with the PPO clip, over B (sample, draw) rows.

    Per row i, with guided_i = uncond + g (cond - uncond) (the conditional prediction alone without uncond):
        surrogate_i = -mean((guided_i - target_i)^2)                  over the non-batch dims
        ratio_i     = exp(surrogate_i - old_i)                         (old None: on-policy, old_i = surrogate_i)
        term_i      = max(-A_i ratio_i, -A_i clamp(ratio_i, 1 - clip_range, 1 + clip_range_high))
        kl_i        = mean((guided_i - reference_i)^2)                 (with reference_prediction)
        loss        = mean_i(term_i) + kl_coef * mean_i(kl_i)
    The surrogate is the denoising loss that AWM's policy-gradient equivalence weights by the advantage; old_i is its
    value under the rollout policy, so the ratio plays the part of DDPO's likelihood ratio.

    prediction, target, uncond_prediction, reference_prediction: (B, ...); advantages, old_surrogates: (B,).
    Differentiable with respect to prediction and uncond_prediction. Returns (loss, stats, surrogates): stats as
    `grpo_loss`'s (`approx_kl` = 0.5 mean(log_ratio^2), `clipfrac`, `ratio_mean/min/max`, `kl` with a reference),
    surrogates (B,) detached.
    """
    dtype = math_dtype(prediction, target, advantages, old_surrogates, uncond_prediction, reference_prediction)
    prediction, target, advantages, old_surrogates, uncond_prediction, reference_prediction = _cast(
        dtype, prediction, target, advantages, old_surrogates, uncond_prediction, reference_prediction)
    guided = guided_output(prediction, uncond_prediction, guidance_scale)
    surrogates = -_reduce((guided - target) ** 2, "mean")                               # (B,)
    log_ratio = surrogates - (surrogates.detach() if old_surrogates is None else old_surrogates)
    ratio = torch.exp(log_ratio)
    low, high = 1.0 - clip_range, 1.0 + (clip_range if clip_range_high is None else clip_range_high)
    terms = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, low, high))
    loss = terms.mean()
    stats = _ratio_stats(log_ratio, ratio, low, high)
    if reference_prediction is not None:
        kl = _reduce((guided - reference_prediction) ** 2, "mean").mean()
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats, surrogates.detach()


# ---------------------------------------------------------------------------------------- negative-aware fine-tuning

NFT_STATS = ("loss", "deviation", "kl")
NFT_WEIGHT_FLOOR = 1e-5  # the adaptive weight's floor, in x0 units


def x0_scale(alpha_prod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per row, c(t) with x0_hat - x0 = -c (prediction - target) (the clean-latent error of a prediction's error):
    epsilon prediction x0_hat = (x_t - sqrt(1 - a) eps_hat) / sqrt(a), so c = sqrt((1 - a) / a); v prediction
    x0_hat = sqrt(a) x_t - sqrt(1 - a) v_hat, so c = sqrt(1 - a). alpha_prod: (B,) alpha_bar(t)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    one_minus = 1.0 - alpha_prod
    return (one_minus / alpha_prod).sqrt() if prediction_type == "epsilon" else one_minus.sqrt()


def nft_loss(prediction, target, old_prediction, advantages, x0_scale, *, beta, adv_clip_max,
             uncond_prediction=None, guidance_scale=1.0, reference_prediction=None, kl_coef=0.0):
    """Negative-aware fine-tuning (DiffusionNFT, arXiv 2509.16117) over B (sample, draw) rows, carried to DDIM's
    epsilon and v prediction through the clean-latent error.

    Per row i, with guided_i = uncond + g (cond - uncond) (cond alone without uncond), old_i the rollout policy's
    guided prediction on the same input (detached) and c_i = x0_scale (so c (pred - target) is the x0 error):
        positive_i = beta guided_i + (1 - beta) old_i          negative_i = (1 + beta) old_i - beta guided_i
        r_i        = clamp(clamp(A_i, -m, m) / m / 2 + 1/2, 0, 1)                  (m = adv_clip_max)
        err(p)     = mean((c_i (p - target_i))^2) / max(mean|c_i (p - target_i)|, 1e-5)  (the weight detached)
        term_i     = m / beta (r_i err(positive_i) + (1 - r_i) err(negative_i))
        loss       = mean_i(term_i) + kl_coef mean_i(mean((guided_i - reference_i)^2))
    A good sample (r > 1/2) pulls the positive prediction to the target, a bad one the negative: the optimum lies
    within |target - old| / beta of the rollout policy (where the positive or the negative prediction meets the
    target; old + (2 r - 1) / beta (target - old) without the adaptive weight), and at guided = old the gradient is
    AWM's advantage-weighted denoising gradient, scaled per row by c / mean|c (old - target)|.

    prediction, target, old_prediction, uncond_prediction, reference_prediction: (B, ...); advantages, x0_scale (B,).
    Differentiable with respect to prediction and uncond_prediction. Returns (loss, stats): `deviation` =
    mean((guided - old)^2) over the rows, `kl` with a reference.
    """
    dtype = math_dtype(prediction, target, old_prediction, advantages, x0_scale, uncond_prediction,
                       reference_prediction)
    prediction, target, old, advantages, scale, uncond_prediction, reference_prediction = _cast(
        dtype, prediction, target, old_prediction, advantages, x0_scale, uncond_prediction, reference_prediction)
    guided = guided_output(prediction, uncond_prediction, guidance_scale)
    m = adv_clip_max
    r = torch.clamp(torch.clamp(advantages, -m, m) / m / 2.0 + 0.5, 0.0, 1.0)                   # (B,)
    c = _per_sample(scale, guided)

    def weighted_error(pred):
        error = c * (pred - target)
        weight = _reduce(error.detach().abs(), "mean").clamp_min(NFT_WEIGHT_FLOOR)
        return _reduce(error**2, "mean") / weight

    positive = beta * guided + (1.0 - beta) * old
    negative = (1.0 + beta) * old - beta * guided
    terms = m / beta * (r * weighted_error(positive) + (1.0 - r) * weighted_error(negative))
    loss = terms.mean()
    stats = {"deviation": _reduce((guided - old).detach() ** 2, "mean").mean()}
    if reference_prediction is not None:
        kl = _reduce((guided - reference_prediction) ** 2, "mean").mean()
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats
