"""Triton kernels: PPO clipped-ratio loss with an optional k3 KL-to-reference term, and its backward.

    log_ratio = logp - old                       (NORMALISED: (logp - old + bias) * scale, GRPO-Guard's RatioNorm)
    ratio = exp(log_ratio);  term = max(-A * ratio, -A * clamp(ratio, 1 - c_low, 1 + c_high))  (HAS_WEIGHT: * w)
    loss = mean(term) + kl_coef * mean(exp(ref - logp) - (ref - logp) - 1)

Forward: one program walks the M entries in BLOCK chunks (M is a micro-batch of samples x steps: small), keeping
vector accumulators and reducing them once at the end, so the order is fixed. It writes
stats = [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl].
Backward: elementwise over M, one launch:
    policy = -A * ratio * [unclipped > clipped or ratio inside [1 - c_low, 1 + c_high]] (* scale) (* w)
    d loss / d logp = (policy + kl_coef * (1 - exp(ref - logp))) * grad / M;  d loss / d bias = policy * grad / M
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgrpo_kernels.step_logprob import launch, scalar_params

BLOCK = 1024
NUM_STATS = 7


@triton.jit
def _log_ratio(logp, old_ptr, bias_ptr, scale_ptr, offs, mask, NORMALISED: tl.constexpr, COMPUTE: tl.constexpr):
    log_ratio = logp - tl.load(old_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if NORMALISED:
        bias = tl.load(bias_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        log_ratio = (log_ratio + bias) * tl.load(scale_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    return log_ratio


@triton.jit
def stat_accumulators(SIZE: tl.constexpr, COMPUTE: tl.constexpr):
    """Vector accumulators of the loss statistics: (loss, log_ratio^2, clipped, ratio sum, ratio min, ratio max, kl)."""
    zeros = tl.zeros((SIZE,), dtype=COMPUTE)
    return (zeros, zeros, zeros, zeros, tl.full((SIZE,), float("inf"), dtype=COMPUTE),
            tl.full((SIZE,), float("-inf"), dtype=COMPUTE), zeros)


@triton.jit
def store_stats(stats_ptr, loss, sq_log_ratio, clipped, ratio_sum, ratio_min, ratio_max, kl, n, kl_coef):
    """Reduce the accumulators over n entries into [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl];
    the loss includes kl_coef * mean kl."""
    kl_mean = tl.sum(kl, axis=0) / n
    tl.store(stats_ptr + 0, tl.sum(loss, axis=0) / n + kl_coef * kl_mean)
    tl.store(stats_ptr + 1, 0.5 * tl.sum(sq_log_ratio, axis=0) / n)
    tl.store(stats_ptr + 2, tl.sum(clipped, axis=0) / n)
    tl.store(stats_ptr + 3, tl.sum(ratio_sum, axis=0) / n)
    tl.store(stats_ptr + 4, tl.min(ratio_min, axis=0))
    tl.store(stats_ptr + 5, tl.max(ratio_max, axis=0))
    tl.store(stats_ptr + 6, kl_mean)


@triton.jit
def _grpo_loss_fwd_kernel(logp_ptr, old_ptr, adv_ptr, ref_ptr, bias_ptr, scale_ptr, weight_ptr, stats_ptr, n,
                          clip_low, clip_high, kl_coef, params_ptr, HAS_REF: tl.constexpr, NORMALISED: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr,
                          PARAMS_IN_MEMORY: tl.constexpr):
    if PARAMS_IN_MEMORY:  # fp64: float arguments would be rounded to fp32
        clip_low = tl.load(params_ptr)
        clip_high = tl.load(params_ptr + 1)
        kl_coef = tl.load(params_ptr + 2)
    loss, sq_log_ratio, clipped, ratio_sum, ratio_min, ratio_max, kl = stat_accumulators(BLOCK_SIZE, COMPUTE)
    for start in range(0, n, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE).to(tl.int64)
        mask = offs < n
        logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        log_ratio = _log_ratio(logp, old_ptr, bias_ptr, scale_ptr, offs, mask, NORMALISED, COMPUTE)
        adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        ratio = tl.exp(log_ratio)
        unclipped_term = -adv * ratio
        clipped_term = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        term = tl.maximum(unclipped_term, clipped_term)
        if HAS_WEIGHT:
            term = term * tl.load(weight_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        loss += tl.where(mask, term, 0.0)
        sq_log_ratio += log_ratio * log_ratio
        clipped += tl.where(mask & ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)), 1.0, 0.0)
        ratio_sum += tl.where(mask, ratio, 0.0)
        ratio_min = tl.minimum(ratio_min, tl.where(mask, ratio, float("inf")))
        ratio_max = tl.maximum(ratio_max, tl.where(mask, ratio, float("-inf")))
        if HAS_REF:
            delta = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(COMPUTE) - logp
            kl += tl.where(mask, tl.exp(delta) - delta - 1.0, 0.0)
    store_stats(stats_ptr, loss, sq_log_ratio, clipped, ratio_sum, ratio_min, ratio_max, kl, n, kl_coef)


@triton.jit
def _grpo_loss_bwd_kernel(grad_ptr, logp_ptr, old_ptr, adv_ptr, ref_ptr, bias_ptr, scale_ptr, weight_ptr,
                          grad_logp_ptr, grad_bias_ptr, n, clip_low, clip_high, kl_coef, params_ptr,
                          HAS_REF: tl.constexpr, NORMALISED: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr, COMPUTE: tl.constexpr, PARAMS_IN_MEMORY: tl.constexpr):
    if PARAMS_IN_MEMORY:
        clip_low = tl.load(params_ptr)
        clip_high = tl.load(params_ptr + 1)
        kl_coef = tl.load(params_ptr + 2)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    adv = tl.load(adv_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    ratio = tl.exp(_log_ratio(logp, old_ptr, bias_ptr, scale_ptr, offs, mask, NORMALISED, COMPUTE))
    unclipped_term = -adv * ratio
    clipped_term = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    inside = (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high)
    active = (unclipped_term > clipped_term) | inside
    policy = tl.where(active, -adv * ratio, 0.0)
    if NORMALISED:
        policy = policy * tl.load(scale_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_WEIGHT:
        policy = policy * tl.load(weight_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    grad = policy
    if HAS_REF:
        delta = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(COMPUTE) - logp
        grad += kl_coef * (1.0 - tl.exp(delta))
    upstream = tl.load(grad_ptr).to(COMPUTE) / n
    tl.store(grad_logp_ptr + offs, grad * upstream, mask=mask)
    if NORMALISED:
        tl.store(grad_bias_ptr + offs, policy * upstream, mask=mask)


def _compute(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _optional(tensors, placeholder):
    """Contiguous tensors, the placeholder for the absent ones (their kernel flags are off)."""
    return [t.contiguous() if t is not None else placeholder for t in tensors]


def grpo_loss_forward(log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias=None, ratio_scale=None,
                      weights=None, *, clip_low: float, clip_high: float, kl_coef: float,
                      compute_dtype: torch.dtype) -> torch.Tensor:
    """Returns the (7,) stats vector [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl].
    ratio_bias and ratio_scale come together or not at all."""
    stats = torch.empty((NUM_STATS,), dtype=compute_dtype, device=log_probs.device)
    tensors = [t.contiguous() for t in (log_probs, old_log_probs, advantages)]
    extra = _optional((ref_log_probs, ratio_bias, ratio_scale, weights), tensors[0])
    params, in_memory = scalar_params([clip_low, clip_high, kl_coef], compute_dtype, log_probs.device)
    launch(_grpo_loss_fwd_kernel, (1,), log_probs.device, *tensors, *extra, stats, log_probs.shape[0],
           float(clip_low), float(clip_high), float(kl_coef), params if in_memory else stats,
           HAS_REF=ref_log_probs is not None, NORMALISED=ratio_scale is not None, HAS_WEIGHT=weights is not None,
           BLOCK_SIZE=BLOCK, COMPUTE=_compute(compute_dtype), PARAMS_IN_MEMORY=in_memory)
    return stats


def grpo_loss_backward(grad_loss, log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias=None,
                       ratio_scale=None, weights=None, *, clip_low: float, clip_high: float, kl_coef: float,
                       compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(d loss / d log_probs (M,), d loss / d ratio_bias (M,) or None without RatioNorm) given the upstream scalar
    gradient grad_loss (0-dim)."""
    n = log_probs.shape[0]
    grad_logp = torch.empty((n,), dtype=compute_dtype, device=log_probs.device)
    grad_bias = torch.empty((n,), dtype=compute_dtype, device=log_probs.device) if ratio_scale is not None else None
    tensors = [t.contiguous() for t in (log_probs, old_log_probs, advantages)]
    extra = _optional((ref_log_probs, ratio_bias, ratio_scale, weights), tensors[0])
    params, in_memory = scalar_params([clip_low, clip_high, kl_coef], compute_dtype, log_probs.device)
    launch(_grpo_loss_bwd_kernel, (triton.cdiv(n, BLOCK),), log_probs.device,
        grad_loss.reshape(1).contiguous(), *tensors, *extra, grad_logp,
        grad_bias if grad_bias is not None else grad_logp, n, float(clip_low), float(clip_high), float(kl_coef),
        params if in_memory else grad_logp, HAS_REF=ref_log_probs is not None, NORMALISED=ratio_scale is not None,
        HAS_WEIGHT=weights is not None, BLOCK_SIZE=BLOCK, COMPUTE=_compute(compute_dtype),
        PARAMS_IN_MEMORY=in_memory)
    return grad_logp, grad_bias
