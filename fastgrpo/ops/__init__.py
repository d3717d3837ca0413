"""Public op API for diffusion GRPO: DDIM-step log-prob (CFG folded in), group advantages, clipped-ratio loss.

Needs only torch. Other diffusion-RL code can use it directly::

    from fastgrpo.ops import ddim_step, ddim_logprob, group_advantages, grpo_loss

Every op takes `backend` ("auto", "triton", "cpp", "reference"); the environment variable FASTGRPO_BACKEND overrides
"auto", which picks Triton for CUDA tensors, the C++ extension for CPU tensors, else the PyTorch reference.
`explain(op, device)` says which backend serves a call and why the others were rejected. The fused backends
differentiate with respect to the model outputs, x_t and x_{t-1} (log-prob) and log_probs (loss); a call that needs
another gradient (of the alphas, say) is served by the reference.
"""

from __future__ import annotations

import torch

from fastgrpo.ops import reference
from fastgrpo.ops.ddim import ddim_logprob_fused, ddim_logprob_op, ddim_step_op  # noqa: F401 (custom ops)
from fastgrpo.ops.dispatch import BackendUnavailableError, explain, select_backend
from fastgrpo.ops.loss import STAT_NAMES, group_advantages_fused, group_advantages_op, grpo_loss_fused, grpo_loss_op  # noqa: F401,E501

__all__ = ["ddim_logprob", "ddim_step", "group_advantages", "grpo_loss", "explain", "BackendUnavailableError"]


def _check_step_inputs(op, model_output, sample, alpha_prod_t, alpha_prod_t_prev, *, eta, uncond_output,
                       prediction_type, reduction, others=()):
    if model_output.dim() < 2:
        raise ValueError(f"{op}: model_output must be (B, ...) with at least 2 dims, got {tuple(model_output.shape)}")
    for name, tensor in (("sample", sample), ("uncond_output", uncond_output), *others):
        if tensor is not None and tensor.shape != model_output.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(tensor.shape)}, expected {tuple(model_output.shape)}")
    batch = model_output.shape[0]
    for name, tensor in (("alpha_prod_t", alpha_prod_t), ("alpha_prod_t_prev", alpha_prod_t_prev)):
        if tensor.shape != (batch,):
            raise ValueError(f"{op}: {name} must have shape ({batch},), got {tuple(tensor.shape)}")
    if not eta > 0:
        raise ValueError(f"{op}: eta must be > 0 (eta = 0 is deterministic DDIM and has no log-prob), got {eta}")
    if prediction_type not in reference.PREDICTION_TYPES:
        raise ValueError(f"{op}: prediction_type must be one of {reference.PREDICTION_TYPES}, got {prediction_type!r}")
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")


def _step_backend(op, model_output, sample, alpha_prod_t, alpha_prod_t_prev, *, eta, uncond_output,
                  prediction_type, reduction, other, backend) -> str:
    """Validate a DDIM-step call and pick its backend (fused backends do not differentiate the schedule)."""
    shape = model_output.shape
    batch = (shape[0],) if shape else ()
    valid = (len(shape) >= 2 and sample.shape == shape and other[1].shape == shape
             and (uncond_output is None or uncond_output.shape == shape) and alpha_prod_t.shape == batch
             and alpha_prod_t_prev.shape == batch and eta > 0 and prediction_type in reference.PREDICTION_TYPES
             and reduction in reference.REDUCTIONS)
    if not valid:  # the fast check above runs on every call; this one says what is wrong
        _check_step_inputs(op, model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta=eta,
                           uncond_output=uncond_output, prediction_type=prediction_type, reduction=reduction,
                           others=(other,))
    if alpha_prod_t.requires_grad or alpha_prod_t_prev.requires_grad:
        rejections = {name: "alpha_prod_t/alpha_prod_t_prev require grad (only the reference differentiates the "
                            "schedule)" for name in ("triton", "cpp")}
        return select_backend(op, model_output, backend, rejections)
    return select_backend(op, model_output, backend)


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
    chosen = _step_backend("ddim_logprob", model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta=eta,
                           uncond_output=uncond_output, prediction_type=prediction_type, reduction=reduction,
                           other=("prev_sample", prev_sample), backend=backend)
    if chosen == "reference":
        return reference.ddim_logprob(model_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev, eta=eta,
                                      uncond_output=uncond_output, guidance_scale=guidance_scale,
                                      prediction_type=prediction_type, reduction=reduction)
    return ddim_logprob_fused(model_output, uncond_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev,
                              float(eta), float(guidance_scale), prediction_type, reduction, chosen)


def ddim_step(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
              alpha_prod_t_prev: torch.Tensor, noise: torch.Tensor, *, eta: float = 1.0,
              uncond_output: torch.Tensor | None = None, guidance_scale: float = 1.0,
              prediction_type: str = "epsilon", reduction: str = "mean",
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one stochastic DDIM step: returns (prev_sample (B, C, H, W), log_prob (B,)), both in the math dtype.

    Same arguments as `ddim_logprob`, with the standard-normal `noise` (B, C, H, W) instead of prev_sample. Equals
    diffusers' `DDIMScheduler.step(..., eta=eta, variance_noise=noise)` (with clip_sample and thresholding off).
    """
    chosen = _step_backend("ddim_step", model_output, sample, alpha_prod_t, alpha_prod_t_prev, eta=eta,
                           uncond_output=uncond_output, prediction_type=prediction_type, reduction=reduction,
                           other=("noise", noise), backend=backend)
    if chosen == "reference":
        return reference.ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, eta=eta,
                                   uncond_output=uncond_output, guidance_scale=guidance_scale,
                                   prediction_type=prediction_type, reduction=reduction)
    return ddim_step_op(model_output, uncond_output, sample, noise, alpha_prod_t, alpha_prod_t_prev, float(eta),
                        float(guidance_scale), prediction_type, reduction, chosen)


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
              backend: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio GRPO loss over M entries (M,) -> (scalar loss, stats); the ratio is clipped to
    [1 - clip_range, 1 + clip_range_high] (None: clip_range); see `reference.grpo_loss`."""
    for name, tensor in (("old_log_probs", old_log_probs), ("advantages", advantages),
                         ("ref_log_probs", ref_log_probs)):
        if tensor is not None and tensor.shape != log_probs.shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(tensor.shape)}, expected {tuple(log_probs.shape)}")
    clip_high = clip_range if clip_range_high is None else clip_range_high
    if not (clip_range > 0 and clip_high > 0):
        raise ValueError(f"grpo_loss: clip_range must be > 0, got {clip_range} (clip_range_high {clip_range_high})")
    rejections = {}
    if any(t is not None and t.requires_grad for t in (old_log_probs, advantages, ref_log_probs)):
        rejections = {name: "old_log_probs/advantages/ref_log_probs require grad (only log_probs is "
                            "differentiated)" for name in ("triton", "cpp")}
    chosen = select_backend("grpo_loss", log_probs, backend, rejections)
    if chosen == "reference":
        return reference.grpo_loss(log_probs, old_log_probs, advantages, clip_range=clip_range,
                                   ref_log_probs=ref_log_probs, kl_coef=kl_coef, clip_range_high=clip_high)
    loss, stats = grpo_loss_fused(log_probs, old_log_probs, advantages, ref_log_probs, float(clip_range),
                                  float(clip_high), float(kl_coef), chosen)
    values = stats.unbind()
    named = dict(zip(STAT_NAMES[1:] if ref_log_probs is not None else STAT_NAMES[1:-1], values[1:]))
    return loss, named
