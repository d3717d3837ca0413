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


def _loss_forward(log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high, kl_coef, backend):
    dtype = compute_dtype(log_probs, old_log_probs, advantages, ref_log_probs)
    if backend == "triton":
        module, _ = triton_kernels()
        return module.grpo_loss_forward(log_probs, old_log_probs, advantages, ref_log_probs, clip_low=clip_low,
                                        clip_high=clip_high, kl_coef=kl_coef, compute_dtype=dtype)
    module, _ = cpp_kernels()
    return module.grpo_loss_forward(*_ready(dtype, log_probs, old_log_probs, advantages, ref_log_probs), clip_low,
                                    clip_high, kl_coef)


@torch.library.custom_op("fastgrpo::grpo_loss", mutates_args=())
def grpo_loss_op(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                 ref_log_probs: torch.Tensor | None, clip_low: float, clip_high: float, kl_coef: float,
                 backend: str) -> torch.Tensor:
    return _loss_forward(log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high, kl_coef, backend)


@grpo_loss_op.register_fake
def _(log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high, kl_coef, backend):
    return log_probs.new_empty((len(STAT_NAMES),), dtype=compute_dtype(log_probs, old_log_probs, advantages,
                                                                       ref_log_probs))


def _loss_backward_impl(grad_loss, log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high,
                        kl_coef, backend):
    dtype = compute_dtype(log_probs, old_log_probs, advantages, ref_log_probs)
    if backend == "triton":
        module, _ = triton_kernels()
        grad = module.grpo_loss_backward(grad_loss.to(dtype), log_probs, old_log_probs, advantages, ref_log_probs,
                                         clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                                         compute_dtype=dtype)
    else:
        module, _ = cpp_kernels()
        grad = module.grpo_loss_backward(*_ready(dtype, grad_loss, log_probs, old_log_probs, advantages,
                                                 ref_log_probs), clip_low, clip_high, kl_coef)
    return grad.to(log_probs.dtype)


@torch.library.custom_op("fastgrpo::grpo_loss_backward", mutates_args=())
def grpo_loss_backward_op(grad_loss: torch.Tensor, log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                          advantages: torch.Tensor, ref_log_probs: torch.Tensor | None, clip_low: float,
                          clip_high: float, kl_coef: float, backend: str) -> torch.Tensor:
    return _loss_backward_impl(grad_loss, log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high,
                               kl_coef, backend)


@grpo_loss_backward_op.register_fake
def _(grad_loss, log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high, kl_coef, backend):
    return torch.empty_like(log_probs)


def _loss_setup(ctx, inputs, output):
    log_probs, old_log_probs, advantages, ref_log_probs, *settings = inputs
    ctx.save_for_backward(log_probs, old_log_probs, advantages, ref_log_probs)
    ctx.settings = settings  # clip_low, clip_high, kl_coef, backend


def _loss_backward(ctx, grad_stats):
    log_probs, old_log_probs, advantages, ref_log_probs = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = grpo_loss_backward_op(grad_stats[0], log_probs, old_log_probs, advantages, ref_log_probs,
                                     *ctx.settings)
    return grad, None, None, None, None, None, None, None


grpo_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# ------------------------------------------------------------------------------------------ eager fast paths


class GrpoLossFunction(torch.autograd.Function):
    """fastgrpo::grpo_loss without the custom-op dispatcher, for eager mode (torch.compile traces the custom op).
    Returns (loss, stats): the loss as an output of its own, so its backward receives the upstream gradient as is
    (one launch; a select of the stats vector would add a zero-fill and a copy), and the stats vector detached."""

    @staticmethod
    def forward(ctx, log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high, kl_coef, backend):
        ctx.save_for_backward(log_probs, old_log_probs, advantages, ref_log_probs)
        ctx.settings = (clip_low, clip_high, kl_coef, backend)
        ctx.set_materialize_grads(False)
        stats = _loss_forward(log_probs, old_log_probs, advantages, ref_log_probs, *ctx.settings)
        ctx.mark_non_differentiable(stats)
        return stats[0], stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 8
        log_probs, old_log_probs, advantages, ref_log_probs = ctx.saved_tensors
        grad = _loss_backward_impl(grad_loss, log_probs, old_log_probs, advantages, ref_log_probs, *ctx.settings)
        return grad, None, None, None, None, None, None, None


def grpo_loss_fused(log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high, kl_coef, backend):
    """(loss 0-dim, stats (7,) without gradient) on a fused backend; the ratio is clipped to
    [1 - clip_low, 1 + clip_high]."""
    args = (log_probs, old_log_probs, advantages, ref_log_probs, clip_low, clip_high, kl_coef, backend)
    if torch.compiler.is_compiling():
        stats = grpo_loss_op(*args)
        return stats[0], stats.detach()
    return GrpoLossFunction.apply(*args)


def group_advantages_fused(rewards, group_size, global_std, unbiased, clip, eps, backend):
    args = (rewards, group_size, global_std, unbiased, clip, eps, backend)
    if torch.compiler.is_compiling():
        return group_advantages_op(*args)
    return _group_advantages(*args)
