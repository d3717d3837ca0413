"""Public op API for diffusion GRPO: sampler-step log-probs (DDIM; flow-matching SDE as flow_grpo samples it; CFG
folded in), group advantages, clipped-ratio loss.

Needs only torch. Other diffusion-RL code can use it directly::

    from fastgrpo.ops import (ddim_step, ddim_logprob, flow_sde_step, flow_sde_logprob, group_advantages, grpo_loss,
                              matching_loss, nft_loss)

Every op takes `backend` ("auto", "triton", "cpp", "reference"); the environment variable FASTGRPO_BACKEND overrides
"auto", which picks Triton for CUDA tensors, the C++ extension for CPU tensors, else the PyTorch reference.
`explain(op, device)` says which backend serves a call and why the others were rejected. The fused backends
differentiate with respect to the model outputs, x_t and x_{t-1} (log-prob) and log_probs (loss); a call that needs
another gradient (of the alphas or sigmas, say) is served by the reference.

Both samplers' steps are Gaussian with a mean affine in x_t and the model output; `reference.ddim_coefficients` and
`reference.flow_sde_coefficients` turn a step's schedule values into a per-sample table, and every backend applies
that one table (the formulas exist once).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fastgrpo.ops import reference
from fastgrpo.ops.dispatch import BackendUnavailableError, explain, select_backend
from fastgrpo.ops.loss import STAT_NAMES, group_advantages_fused, group_advantages_op, grpo_loss_fused, grpo_loss_op  # noqa: F401,E501
from fastgrpo.ops.matching import matching_loss_fused, matching_loss_op  # noqa: F401 (custom ops)
from fastgrpo.ops.nft import nft_loss_fused, nft_loss_op  # noqa: F401 (custom ops)
from fastgrpo.ops.step import step_logprob_fused, step_logprob_op, step_sample_op  # noqa: F401 (custom ops)

__all__ = ["ddim_logprob", "ddim_step", "flow_sde_logprob", "flow_sde_step", "group_advantages", "grpo_loss",
           "matching_loss", "nft_loss", "explain", "BackendUnavailableError"]


def _check_step_inputs(op, model_output, sample, schedule, *, uncond_output, reduction, others=()):
    if model_output.dim() < 2:
        raise ValueError(f"{op}: model_output must be (B, ...) with at least 2 dims, got {tuple(model_output.shape)}")
    for name, tensor in (("sample", sample), ("uncond_output", uncond_output), *others):
        if tensor is not None and tensor.shape != model_output.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}, expected {tuple(model_output.shape)}")
    batch = model_output.shape[0]
    for name, tensor in schedule:
        if tensor.shape != (batch,):
            raise ValueError(f"{op}: {name} must have shape ({batch},), got {tuple(tensor.shape)}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")


def _step_backend(op, model_output, sample, schedule, *, uncond_output, reduction, other, backend) -> str:
    """Validate a sampler-step call and pick its backend (fused backends do not differentiate the schedule).
    schedule: ((name, (B,) tensor), ...) such as the alphas or sigmas; other: (name, tensor) of prev_sample/noise."""
    shape = model_output.shape
    batch = (shape[0],) if shape else ()
    valid = (len(shape) >= 2 and sample.shape == shape and other[1].shape == shape
             and (uncond_output is None or uncond_output.shape == shape)
             and all(tensor.shape == batch for _, tensor in schedule) and reduction in reference.REDUCTIONS)
    if not valid:  # the fast check above runs on every call; this one says what is wrong
        _check_step_inputs(op, model_output, sample, schedule, uncond_output=uncond_output, reduction=reduction,
                           others=(other,))
    if any(tensor.requires_grad for _, tensor in schedule):
        names = "/".join(name for name, _ in schedule)
        rejections = {backend_name: f"{names} require grad (only the reference differentiates the schedule)"
                      for backend_name in ("triton", "cpp")}
        return select_backend(op, model_output, backend, rejections)
    return select_backend(op, model_output, backend)


def _check_ddim(op, eta, prediction_type):
    if not eta > 0:
        raise ValueError(f"{op}: eta must be > 0 (eta = 0 is deterministic DDIM and has no log-prob), got {eta}")
    if prediction_type not in reference.PREDICTION_TYPES:
        raise ValueError(f"{op}: prediction_type must be one of {reference.PREDICTION_TYPES}, got {prediction_type!r}")


def _check_flow(op, noise_level, sde_type, sigma_max):
    if not noise_level > 0:
        raise ValueError(f"{op}: noise_level must be > 0 (0 is the deterministic ODE step), got {noise_level}")
    if sde_type not in reference.SDE_TYPES:
        raise ValueError(f"{op}: sde_type must be one of {reference.SDE_TYPES}, got {sde_type!r}")
    if sde_type == "sde" and sigma_max is None:
        raise ValueError(f"{op}: sde_type 'sde' needs sigma_max, the value used where sigma == 1 (flow_grpo: "
                         "scheduler.sigmas[1])")


_TABLES: OrderedDict = OrderedDict()
_MAX_TABLES = 256


def _table(build, *schedule, **settings) -> torch.Tensor:
    """A step table for the fused backends: float64, on the schedule's device, no gradient.

    Building one is about 30 tiny tensor ops (100+ us on a CPU, as many launches on a GPU), as much as the fused
    kernel itself at SD shapes, while samplers pass the same schedule tensors (or views of them) at every call. So
    tables are cached by the schedule tensors' memory (address, shape, strides, dtype, device) and the settings, and a
    hit is checked against the tensors' version counters (an in-place change invalidates it). The cache holds the
    schedule tensors, so their memory cannot be reused by another tensor while an entry lives (LRU, 256 entries)."""
    if torch.compiler.is_compiling() or any(t.is_inference() for t in schedule):  # no version counter to check
        return build(*(t.detach().to(torch.float64) for t in schedule), **settings)
    key = (build, tuple(sorted(settings.items())),
           *((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in schedule))
    entry = _TABLES.get(key)
    if entry is not None and all(t._version == version for t, version in zip(entry[0], entry[1])):
        _TABLES.move_to_end(key)
        return entry[2]
    table = build(*(t.detach().to(torch.float64) for t in schedule), **settings)
    _TABLES[key] = (schedule, tuple(t._version for t in schedule), table)
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return table


def _ddim_op(name: str, run_reference, fused_op, model_output, sample, other: tuple[str, torch.Tensor],
             alpha_prod_t, alpha_prod_t_prev, *, eta, uncond_output, guidance_scale, prediction_type, reduction,
             backend):
    """A DDIM op: arguments checked, backend chosen, then `run_reference()` or `fused_op` on the coefficient table.
    other: the op's third latent, (its name, the tensor): prev_sample (log-prob) or noise (step)."""
    _check_ddim(name, eta, prediction_type)
    chosen = _step_backend(name, model_output, sample,
                           (("alpha_prod_t", alpha_prod_t), ("alpha_prod_t_prev", alpha_prod_t_prev)),
                           uncond_output=uncond_output, reduction=reduction, other=other, backend=backend)
    if chosen == "reference":
        return run_reference()
    table = _table(reference.ddim_coefficients, alpha_prod_t, alpha_prod_t_prev, eta=eta,
                   prediction_type=prediction_type)
    return fused_op(model_output, uncond_output, sample, other[1], table, float(guidance_scale), reduction, chosen)


def ddim_logprob(model_output: torch.Tensor, sample: torch.Tensor, prev_sample: torch.Tensor,
                 alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, *, eta: float = 1.0,
                 uncond_output: torch.Tensor | None = None, guidance_scale: float = 1.0,
                 prediction_type: str = "epsilon", reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Per-sample log p(prev_sample | sample) of one stochastic DDIM step.

    model_output: (B, C, H, W) conditional model output (or the only one without CFG); uncond_output: same shape or
    None; sample = x_t, prev_sample = x_{t-1}: (B, C, H, W); alpha_prod_t, alpha_prod_t_prev: (B,) cumulative alphas.
    Any float dtype; math in fp32 (fp64 for fp64 inputs). Returns (B,) log-probs, mean (or sum) over C, H, W.
    Differentiable with respect to model_output and uncond_output.
    """
    def run_reference():
        return reference.ddim_logprob(model_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev, eta=eta,
                                      uncond_output=uncond_output, guidance_scale=guidance_scale,
                                      prediction_type=prediction_type, reduction=reduction)

    return _ddim_op("ddim_logprob", run_reference, step_logprob_fused, model_output, sample,
                    ("prev_sample", prev_sample), alpha_prod_t, alpha_prod_t_prev, eta=eta, uncond_output=uncond_output,
                    guidance_scale=guidance_scale, prediction_type=prediction_type, reduction=reduction, backend=backend)


def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
              alpha_prod_t_prev: torch.Tensor, noise: torch.Tensor, *, eta: float = 1.0,
              uncond_output: torch.Tensor | None = None, guidance_scale: float = 1.0,
              prediction_type: str = "epsilon", reduction: str = "mean",
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one stochastic DDIM step: returns (prev_sample (B, C, H, W), log_prob (B,)), both in the math dtype.

    Same arguments as `ddim_logprob`, with the standard-normal `noise` (B, C, H, W) instead of prev_sample. Equals
    diffusers' `DDIMScheduler.step(..., eta=eta, variance_noise=noise)` (with clip_sample and thresholding off).
    """
    def run_reference():
        return reference.ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, eta=eta,
                                   uncond_output=uncond_output, guidance_scale=guidance_scale,
                                   prediction_type=prediction_type, reduction=reduction)

    return _ddim_op("ddim_step", run_reference, step_sample_op, model_output, sample, ("noise", noise), alpha_prod_t,
                    alpha_prod_t_prev, eta=eta, uncond_output=uncond_output, guidance_scale=guidance_scale,
                    prediction_type=prediction_type, reduction=reduction, backend=backend)


def flow_sde_logprob(model_output: torch.Tensor, sample: torch.Tensor, prev_sample: torch.Tensor,
                     sigma: torch.Tensor, sigma_prev: torch.Tensor, *, noise_level: float = 0.7,
                     sde_type: str = "sde", sigma_max: float | None = None,
                     uncond_output: torch.Tensor | None = None, guidance_scale: float = 1.0,
                     reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Per-sample log p(prev_sample | sample) of one flow-matching SDE step, as flow_grpo's `sde_step_with_logprob`.

    model_output: (B, ...) predicted velocity (conditional; CFG folded in with uncond_output and guidance_scale);
    sample = x at sigma, prev_sample = x at sigma_prev; sigma, sigma_prev: (B,) from diffusers'
    `FlowMatchEulerDiscreteScheduler.sigmas` (sigma_prev the next entry, smaller). sde_type "sde" (needs sigma_max,
    flow_grpo's `scheduler.sigmas[1]`, used where sigma == 1) or "cps" (log-prob without constants, as flow_grpo).
    The formulas: `reference.flow_sde_coefficients`. Returns (B,) in fp32 (fp64 for fp64 inputs), mean (or sum)
    over the non-batch dims. Differentiable with respect to model_output, uncond_output, sample and prev_sample.
    """
    _check_flow("flow_sde_logprob", noise_level, sde_type, sigma_max)
    chosen = _step_backend("flow_sde_logprob", model_output, sample, (("sigma", sigma), ("sigma_prev", sigma_prev)),
                           uncond_output=uncond_output, reduction=reduction, other=("prev_sample", prev_sample),
                           backend=backend)
    if chosen == "reference":
        return reference.flow_sde_logprob(model_output, sample, prev_sample, sigma, sigma_prev,
                                          noise_level=noise_level, sde_type=sde_type, sigma_max=sigma_max,
                                          uncond_output=uncond_output, guidance_scale=guidance_scale,
                                          reduction=reduction)
    table = _table(reference.flow_sde_coefficients, sigma, sigma_prev, noise_level=noise_level, sde_type=sde_type,
                   sigma_max=sigma_max)
    return step_logprob_fused(model_output, uncond_output, sample, prev_sample, table, float(guidance_scale),
                              reduction, chosen)


def flow_sde_step(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, sigma_prev: torch.Tensor,
                  noise: torch.Tensor, *, noise_level: float = 0.7, sde_type: str = "sde",
                  sigma_max: float | None = None, uncond_output: torch.Tensor | None = None,
                  guidance_scale: float = 1.0, reduction: str = "mean",
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one flow-matching SDE step with the standard-normal `noise`: (prev_sample, log_prob), as flow_grpo's
    `sde_step_with_logprob(..., prev_sample=None)` with that noise. Arguments as `flow_sde_logprob`."""
    _check_flow("flow_sde_step", noise_level, sde_type, sigma_max)
    chosen = _step_backend("flow_sde_step", model_output, sample, (("sigma", sigma), ("sigma_prev", sigma_prev)),
                           uncond_output=uncond_output, reduction=reduction, other=("noise", noise), backend=backend)
    if chosen == "reference":
        return reference.flow_sde_step(model_output, sample, sigma, sigma_prev, noise, noise_level=noise_level,
                                       sde_type=sde_type, sigma_max=sigma_max, uncond_output=uncond_output,
                                       guidance_scale=guidance_scale, reduction=reduction)
    table = _table(reference.flow_sde_coefficients, sigma, sigma_prev, noise_level=noise_level, sde_type=sde_type,
                   sigma_max=sigma_max)
    return step_sample_op(model_output, uncond_output, sample, noise, table, float(guidance_scale), reduction, chosen)


def group_advantages(rewards: torch.Tensor, group_size: int | torch.Tensor, *, std: str = "group",
                     clip: float | None = None, eps: float = 1e-8, unbiased: bool = True,
                     backend: str = "auto") -> torch.Tensor:
    """Group-normalised advantages (N,) from rewards (N,); see `reference.group_advantages` for the options."""
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D (N,), got {tuple(rewards.shape)}")
    if isinstance(group_size, torch.Tensor):
        if group_size.shape != rewards.shape or group_size.is_floating_point():
            raise ValueError("group_advantages: group ids must be an integer tensor shaped like rewards")
    elif group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"group_advantages: group_size must be >= 2 and divide N={rewards.shape[0]}, "
                         f"got {group_size}")
    if std not in ("group", "global"):
        raise ValueError(f"group_advantages: std must be 'group' or 'global', got {std!r}")
    rejections = {}
    if isinstance(group_size, torch.Tensor):
        rejections = {name: "group ids are not supported (pass an int group_size)" for name in ("triton", "cpp")}
    elif rewards.requires_grad:
        rejections = {name: "rewards require grad (only the reference differentiates)" for name in ("triton", "cpp")}
    chosen = select_backend("group_advantages", rewards, backend, rejections)
    if chosen == "reference":
        return reference.group_advantages(rewards, group_size, std=std, clip=clip, eps=eps, unbiased=unbiased)
    return group_advantages_fused(rewards, int(group_size), std == "global", unbiased,
                                  None if clip is None else float(clip), float(eps), chosen)


def grpo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor, *, clip_range: float,
              ref_log_probs: torch.Tensor | None = None, kl_coef: float = 0.0, clip_range_high: float | None = None,
              ratio_bias: torch.Tensor | None = None, ratio_scale: torch.Tensor | None = None,
              weights: torch.Tensor | None = None,
              backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio GRPO loss over M entries (M,) -> (scalar loss, stats); the ratio is clipped to
    [1 - clip_range, 1 + clip_range_high] (None: clip_range). ratio_bias + ratio_scale (M,): GRPO-Guard's ratio
    normalisation; weights (M,): per-entry weights of the clipped term. See `reference.grpo_loss`."""
    optional = (("ref_log_probs", ref_log_probs), ("ratio_bias", ratio_bias), ("ratio_scale", ratio_scale),
                ("weights", weights))
    for name, tensor in (("old_log_probs", old_log_probs), ("advantages", advantages), *optional):
        if tensor is not None and tensor.shape != log_probs.shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(tensor.shape)}, expected {tuple(log_probs.shape)}")
    if (ratio_bias is None) != (ratio_scale is None):
        raise ValueError("grpo_loss: ratio_bias and ratio_scale come together (GRPO-Guard's ratio normalisation)")
    clip_high = clip_range if clip_range_high is None else clip_range_high
    if not (clip_range > 0 and clip_high > 0):
        raise ValueError(f"grpo_loss: clip_range must be > 0, got {clip_range} (clip_range_high {clip_range_high})")
    rejections = {}
    if any(t is not None and t.requires_grad for t in (old_log_probs, advantages, ref_log_probs, ratio_scale,
                                                       weights)):
        rejections = {name: "old_log_probs/advantages/ref_log_probs/ratio_scale/weights require grad (only "
                            "log_probs and ratio_bias are differentiated)" for name in ("triton", "cpp")}
    chosen = select_backend("grpo_loss", log_probs, backend, rejections)
    if chosen == "reference":
        return reference.grpo_loss(log_probs, old_log_probs, advantages, clip_range=clip_range,
                                   ref_log_probs=ref_log_probs, kl_coef=kl_coef, clip_range_high=clip_high,
                                   ratio_bias=ratio_bias, ratio_scale=ratio_scale, weights=weights)
    loss, stats = grpo_loss_fused(log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale,
                                  weights, float(clip_range), float(clip_high), float(kl_coef), chosen)
    values = stats.unbind()
    named = dict(zip(STAT_NAMES[1:] if ref_log_probs is not None else STAT_NAMES[1:-1], values[1:]))
    return loss, named


def matching_loss(prediction: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor, *, clip_range: float,
                  old_surrogates: torch.Tensor | None = None, clip_range_high: float | None = None,
                  uncond_prediction: torch.Tensor | None = None, guidance_scale: float = 1.0,
                  reference_prediction: torch.Tensor | None = None, kl_coef: float = 0.0,
                  backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Advantage-weighted matching loss with the PPO clip over B rows, one fused pass over the (B, ...) predictions:
    per row the surrogate -mean((guided - target)^2), its ratio exp(surrogate - old) (old None: on-policy, ratio 1),
    the clipped advantage-weighted term, and optionally kl_coef * mean((guided - reference)^2). See
    `reference.matching_loss`. Returns (loss, stats, surrogates (B,) detached); differentiable with respect to
    prediction and uncond_prediction."""
    if prediction.dim() < 2:
        raise ValueError(f"matching_loss: prediction must be (B, ...) with at least 2 dims, got "
                         f"{tuple(prediction.shape)}")
    for name, tensor in (("target", target), ("uncond_prediction", uncond_prediction),
                         ("reference_prediction", reference_prediction)):
        if tensor is not None and tensor.shape != prediction.shape:
            raise ValueError(f"matching_loss: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(prediction.shape)}")
    for name, tensor in (("advantages", advantages), ("old_surrogates", old_surrogates)):
        if tensor is not None and tensor.shape != prediction.shape[:1]:
            raise ValueError(f"matching_loss: {name} must have shape ({prediction.shape[0]},), got "
                             f"{tuple(tensor.shape)}")
    clip_high = clip_range if clip_range_high is None else clip_range_high
    if not (clip_range > 0 and clip_high > 0):
        raise ValueError(f"matching_loss: clip_range must be > 0, got {clip_range} (clip_range_high "
                         f"{clip_range_high})")
    rejections = {}
    if any(t is not None and t.requires_grad for t in (target, advantages, old_surrogates, reference_prediction)):
        rejections = {name: "target/advantages/old_surrogates/reference_prediction require grad (only the "
                            "predictions are differentiated)" for name in ("triton", "cpp")}
    chosen = select_backend("matching_loss", prediction, backend, rejections)
    if chosen == "reference":
        return reference.matching_loss(prediction, target, advantages, clip_range=clip_range,
                                       old_surrogates=old_surrogates, clip_range_high=clip_high,
                                       uncond_prediction=uncond_prediction, guidance_scale=guidance_scale,
                                       reference_prediction=reference_prediction, kl_coef=kl_coef)
    loss, stats, surrogates = matching_loss_fused(prediction, uncond_prediction, target, reference_prediction,
                                                  advantages, old_surrogates, float(guidance_scale),
                                                  float(clip_range), float(clip_high), float(kl_coef), chosen)
    names = reference.MATCHING_STATS[1:] if reference_prediction is not None else reference.MATCHING_STATS[1:-1]
    return loss, dict(zip(names, stats.unbind()[1:])), surrogates


def nft_loss(prediction: torch.Tensor, target: torch.Tensor, old_prediction: torch.Tensor, advantages: torch.Tensor,
             x0_scale: torch.Tensor, *, beta: float = 1.0, adv_clip_max: float = 2.5,
             uncond_prediction: torch.Tensor | None = None, guidance_scale: float = 1.0,
             reference_prediction: torch.Tensor | None = None, kl_coef: float = 0.0,
             backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative-aware fine-tuning loss (DiffusionNFT) over B rows, one fused pass over the (B, ...) predictions: per
    row the implicit positive and negative predictions around the rollout policy's `old_prediction`, their
    adaptively weighted clean-latent errors mixed by the clipped advantage, and optionally kl_coef * mean((guided -
    reference)^2). See `reference.nft_loss`; `reference.x0_scale` gives x0_scale. Returns (loss, stats);
    differentiable with respect to prediction and uncond_prediction."""
    if prediction.dim() < 2:
        raise ValueError(f"nft_loss: prediction must be (B, ...) with at least 2 dims, got {tuple(prediction.shape)}")
    for name, tensor in (("target", target), ("old_prediction", old_prediction),
                         ("uncond_prediction", uncond_prediction), ("reference_prediction", reference_prediction)):
        if tensor is not None and tensor.shape != prediction.shape:
            raise ValueError(f"nft_loss: {name} has shape {tuple(tensor.shape)}, expected {tuple(prediction.shape)}")
    for name, tensor in (("advantages", advantages), ("x0_scale", x0_scale)):
        if tensor.shape != prediction.shape[:1]:
            raise ValueError(f"nft_loss: {name} must have shape ({prediction.shape[0]},), got {tuple(tensor.shape)}")
    if not beta > 0:
        raise ValueError(f"nft_loss: beta must be > 0, got {beta}")
    if not adv_clip_max > 0:
        raise ValueError(f"nft_loss: adv_clip_max must be > 0, got {adv_clip_max}")
    rejections = {}
    if any(t is not None and t.requires_grad
           for t in (target, old_prediction, advantages, x0_scale, reference_prediction)):
        rejections = {name: "target/old_prediction/advantages/x0_scale/reference_prediction require grad (only the "
                            "predictions are differentiated)" for name in ("triton", "cpp")}
    chosen = select_backend("nft_loss", prediction, backend, rejections)
    if chosen == "reference":
        return reference.nft_loss(prediction, target, old_prediction, advantages, x0_scale, beta=beta,
                                  adv_clip_max=adv_clip_max, uncond_prediction=uncond_prediction,
                                  guidance_scale=guidance_scale, reference_prediction=reference_prediction,
                                  kl_coef=kl_coef)
    loss, stats = nft_loss_fused(prediction, uncond_prediction, target, old_prediction, reference_prediction,
                                 advantages, x0_scale, float(guidance_scale), float(beta), float(adv_clip_max),
                                 float(kl_coef), chosen)
    names = reference.NFT_STATS[1:] if reference_prediction is not None else reference.NFT_STATS[1:-1]
    return loss, dict(zip(names, stats.unbind()[1:]))
