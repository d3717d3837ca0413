"""Group advantages and the clipped-ratio loss on the fused backends (Triton, C++), as torch custom ops.

`fastgrpo::grpo_loss` returns the (7,) vector [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl];
only entry 0 carries a gradient (one forward launch, one backward launch).
"""

from __future__ import annotations

import torch

from fastgrpo.ops.step import compute_dtype
from fastgrpo.ops.dispatch import cpp_kernels, triton_kernels

STAT_NAMES = ("loss", "approx_kl", "clipfrac", "ratio_mean", "ratio_min", "ratio_max", "kl")


def _ready(dtype, *tensors):
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def _group_advantages(rewards, group_size, global_std, unbiased, clip, eps, backend):
    dtype = compute_dtype(rewards)
    if backend == "triton":
        module, _ = triton_kernels()
        return module.group_advantages(rewards, group_size, global_std=global_std, unbiased=unbiased, clip=clip,
                                       eps=eps, compute_dtype=dtype)
    module, _ = cpp_kernels()
    return module.group_advantages(rewards.to(dtype).contiguous(), group_size, global_std, unbiased, clip, eps)


@torch.library.custom_op("fastgrpo::group_advantages", mutates_args=())
def group_advantages_op(rewards: torch.Tensor, group_size: int, global_std: bool, unbiased: bool,
                        clip: float | None, eps: float, backend: str) -> torch.Tensor:
    return _group_advantages(rewards, group_size, global_std, unbiased, clip, eps, backend)


@group_advantages_op.register_fake
def _(rewards, group_size, global_std, unbiased, clip, eps, backend):
    return torch.empty_like(rewards, dtype=compute_dtype(rewards))


def _loss_forward(log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights, clip_low,
                  clip_high, kl_coef, backend):
    extras = (ref_log_probs, ratio_bias, ratio_scale, weights)
    dtype = compute_dtype(log_probs, old_log_probs, advantages, *extras)
    if backend == "triton":
        module, _ = triton_kernels()
        return module.grpo_loss_forward(log_probs, old_log_probs, advantages, *extras, clip_low=clip_low,
                                        clip_high=clip_high, kl_coef=kl_coef, compute_dtype=dtype)
    module, _ = cpp_kernels()
    return module.grpo_loss_forward(*_ready(dtype, log_probs, old_log_probs, advantages, *extras), clip_low,
                                    clip_high, kl_coef)


@torch.library.custom_op("fastgrpo::grpo_loss", mutates_args=())
def grpo_loss_op(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                 ref_log_probs: torch.Tensor | None, ratio_bias: torch.Tensor | None,
                 ratio_scale: torch.Tensor | None, weights: torch.Tensor | None, clip_low: float, clip_high: float,
                 kl_coef: float, backend: str) -> torch.Tensor:
    return _loss_forward(log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights,
                         clip_low, clip_high, kl_coef, backend)


@grpo_loss_op.register_fake
def _(log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights, clip_low, clip_high,
      kl_coef, backend):
    return log_probs.new_empty((len(STAT_NAMES),), dtype=compute_dtype(
        log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights))


def _loss_backward_impl(grad_loss, log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale,
                        weights, clip_low, clip_high, kl_coef, backend):
    """(d loss / d log_probs, d loss / d ratio_bias or None), in the inputs' dtypes."""
    extras = (ref_log_probs, ratio_bias, ratio_scale, weights)
    dtype = compute_dtype(log_probs, old_log_probs, advantages, *extras)
    if backend == "triton":
        module, _ = triton_kernels()
        grad, grad_bias = module.grpo_loss_backward(grad_loss.to(dtype), log_probs, old_log_probs, advantages,
                                                    *extras, clip_low=clip_low, clip_high=clip_high,
                                                    kl_coef=kl_coef, compute_dtype=dtype)
    else:
        module, _ = cpp_kernels()
        grad, grad_bias = module.grpo_loss_backward(*_ready(dtype, grad_loss, log_probs, old_log_probs, advantages,
                                                            *extras), clip_low, clip_high, kl_coef)
    return grad.to(log_probs.dtype), (grad_bias.to(ratio_bias.dtype) if grad_bias is not None else None)


@torch.library.custom_op("fastgrpo::grpo_loss_backward", mutates_args=())
def grpo_loss_backward_op(grad_loss: torch.Tensor, log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                          advantages: torch.Tensor, ref_log_probs: torch.Tensor | None,
                          ratio_bias: torch.Tensor | None, ratio_scale: torch.Tensor | None,
                          weights: torch.Tensor | None, clip_low: float, clip_high: float, kl_coef: float,
                          backend: str) -> list[torch.Tensor]:
    grad, grad_bias = _loss_backward_impl(grad_loss, log_probs, old_log_probs, advantages, ref_log_probs,
                                          ratio_bias, ratio_scale, weights, clip_low, clip_high, kl_coef, backend)
    return [grad, grad_bias if grad_bias is not None else grad.new_empty((0,))]


@grpo_loss_backward_op.register_fake
def _(grad_loss, log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights, clip_low,
      clip_high, kl_coef, backend):
    return [torch.empty_like(log_probs),
            torch.empty_like(ratio_bias) if ratio_scale is not None else log_probs.new_empty((0,))]


def _loss_setup(ctx, inputs, output):
    tensors, settings = inputs[:7], inputs[7:]
    ctx.save_for_backward(*tensors)
    ctx.settings = settings  # clip_low, clip_high, kl_coef, backend


def _loss_backward(ctx, grad_stats):
    tensors = ctx.saved_tensors
    grad = grad_bias = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[4]:
        grad, grad_bias = grpo_loss_backward_op(grad_stats[0], *tensors, *ctx.settings)
        grad = grad if ctx.needs_input_grad[0] else None
        grad_bias = grad_bias if ctx.needs_input_grad[4] else None
    return grad, None, None, None, grad_bias, None, None, None, None, None, None


grpo_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# ------------------------------------------------------------------------------------------ eager fast paths


class GrpoLossFunction(torch.autograd.Function):
    """fastgrpo::grpo_loss without the custom-op dispatcher, for eager mode (torch.compile traces the custom op).
    Returns (loss, stats): the loss as an output of its own, so its backward receives the upstream gradient as is
    (one launch; a select of the stats vector would add a zero-fill and a copy), and the stats vector detached."""

    @staticmethod
    def forward(ctx, log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights,
                clip_low, clip_high, kl_coef, backend):
        tensors = (log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights)
        ctx.save_for_backward(*tensors)
        ctx.settings = (clip_low, clip_high, kl_coef, backend)
        ctx.set_materialize_grads(False)
        stats = _loss_forward(*tensors, *ctx.settings)
        ctx.mark_non_differentiable(stats)
        return stats[0], stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if grad_loss is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[4]):
            return (None,) * 11
        grad, grad_bias = _loss_backward_impl(grad_loss, *ctx.saved_tensors, *ctx.settings)
        return (grad if ctx.needs_input_grad[0] else None, None, None, None,
                grad_bias if ctx.needs_input_grad[4] else None, *(None,) * 6)


def grpo_loss_fused(log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights, clip_low,
                    clip_high, kl_coef, backend):
    """(loss 0-dim, stats (7,) without gradient) on a fused backend; the ratio is clipped to
    [1 - clip_low, 1 + clip_high]."""
    args = (log_probs, old_log_probs, advantages, ref_log_probs, ratio_bias, ratio_scale, weights, clip_low,
            clip_high, kl_coef, backend)
    if torch.compiler.is_compiling():
        stats = grpo_loss_op(*args)
        return stats[0], stats.detach()
    return GrpoLossFunction.apply(*args)


def group_advantages_fused(rewards, group_size, global_std, unbiased, clip, eps, backend):
    args = (rewards, group_size, global_std, unbiased, clip, eps, backend)
    if torch.compiler.is_compiling():
        return group_advantages_op(*args)
    return _group_advantages(*args)
