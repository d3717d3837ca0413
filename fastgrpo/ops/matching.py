"""The advantage-weighted matching loss on the fused backends (Triton, C++), as torch custom ops.

Forward (one launch): per row the squared error of the guided prediction to its target (and to the reference), the
surrogate, ratio, clipped term and the row's gradient coefficient d loss / d surrogate; then the (7,) statistics
vector [loss, approx_kl, clipfrac, ratio_mean, ratio_min, ratio_max, kl] over the rows. It returns the statistics and
a (B, 3) table [surrogate, coefficient, kl] per row. Backward (one launch): every gradient is a per-row combination
of (guided - target) and (guided - reference), recomputed from the inputs, so the forward stores no (B, ...) tensor.
"""

from __future__ import annotations

import torch

from fastgrpo.ops.dispatch import cpp_kernels, triton_kernels
from fastgrpo.ops.step import compute_dtype


def _ready(dtype, *tensors):
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def _forward(cond, uncond, target, ref, advantages, old, guidance, clip_low, clip_high, kl_coef, backend):
    dtype = compute_dtype(cond, uncond, target, ref, advantages, old)
    if backend == "triton":
        module, _ = triton_kernels()
        return module.matching_loss_forward(cond, uncond, target, ref, advantages, old, guidance=guidance,
                                            clip_low=clip_low, clip_high=clip_high, kl_coef=kl_coef,
                                            compute_dtype=dtype)
    module, _ = cpp_kernels()
    return module.matching_loss_forward(*_ready(dtype, cond, uncond, target, ref, advantages, old), guidance,
                                        clip_low, clip_high, kl_coef)


def _backward(grad_loss, cond, uncond, target, ref, rows, guidance, kl_coef, needs_cond, needs_uncond, backend):
    """(d loss / d cond or None, d loss / d uncond or None) in the predictions' dtypes."""
    dtype = rows.dtype
    if backend == "triton":
        module, _ = triton_kernels()
        grad_cond, grad_uncond = module.matching_loss_backward(grad_loss, cond, uncond, target, ref, rows,
                                                               guidance=guidance, kl_coef=kl_coef,
                                                               needs=(needs_cond, needs_uncond))
    else:
        module, _ = cpp_kernels()
        grad_cond, grad_uncond = module.matching_loss_backward(*_ready(dtype, grad_loss.reshape(1), cond, uncond,
                                                                       target, ref, rows), guidance, kl_coef,
                                                               needs_cond, needs_uncond)
    return (grad_cond.to(cond.dtype).view(cond.shape) if needs_cond else None,
            grad_uncond.to(uncond.dtype).view(uncond.shape) if needs_uncond else None)


@torch.library.custom_op("fastgrpo::matching_loss", mutates_args=())
def matching_loss_op(cond: torch.Tensor, uncond: torch.Tensor | None, target: torch.Tensor, ref: torch.Tensor | None,
                     advantages: torch.Tensor, old: torch.Tensor | None, guidance: float, clip_low: float,
                     clip_high: float, kl_coef: float, backend: str) -> list[torch.Tensor]:
    stats, rows = _forward(cond, uncond, target, ref, advantages, old, guidance, clip_low, clip_high, kl_coef,
                           backend)
    return [stats, rows]


@matching_loss_op.register_fake
def _(cond, uncond, target, ref, advantages, old, guidance, clip_low, clip_high, kl_coef, backend):
    dtype = compute_dtype(cond, uncond, target, ref, advantages, old)
    return [cond.new_empty((7,), dtype=dtype), cond.new_empty((cond.shape[0], 3), dtype=dtype)]


@torch.library.custom_op("fastgrpo::matching_loss_backward", mutates_args=())
def matching_loss_backward_op(grad_loss: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                              target: torch.Tensor, ref: torch.Tensor | None, rows: torch.Tensor, guidance: float,
                              kl_coef: float, needs_cond: bool, needs_uncond: bool, backend: str) -> list[torch.Tensor]:
    grad_cond, grad_uncond = _backward(grad_loss, cond, uncond, target, ref, rows, guidance, kl_coef, needs_cond,
                                       needs_uncond, backend)
    empty = cond.new_empty((0,))
    return [grad_cond if grad_cond is not None else empty, grad_uncond if grad_uncond is not None else empty]


@matching_loss_backward_op.register_fake
def _(grad_loss, cond, uncond, target, ref, rows, guidance, kl_coef, needs_cond, needs_uncond, backend):
    return [torch.empty_like(cond) if needs_cond else cond.new_empty((0,)),
            torch.empty_like(uncond) if needs_uncond and uncond is not None else cond.new_empty((0,))]


def _setup(ctx, inputs, output):
    cond, uncond, target, ref = inputs[:4]
    ctx.save_for_backward(cond, uncond, target, ref, output[1])
    ctx.settings = (inputs[6], inputs[9], inputs[10])  # guidance, kl_coef, backend


def _op_backward(ctx, grad_outputs):
    cond, uncond, target, ref, rows = ctx.saved_tensors
    guidance, kl_coef, backend = ctx.settings
    needs_cond, needs_uncond = ctx.needs_input_grad[0], uncond is not None and ctx.needs_input_grad[1]
    grad_cond = grad_uncond = None
    if needs_cond or needs_uncond:
        grads = matching_loss_backward_op(grad_outputs[0][0], cond, uncond, target, ref, rows, guidance, kl_coef,
                                          needs_cond, needs_uncond, backend)
        grad_cond = grads[0] if needs_cond else None
        grad_uncond = grads[1] if needs_uncond else None
    return grad_cond, grad_uncond, *(None,) * 9


matching_loss_op.register_autograd(_op_backward, setup_context=_setup)


class MatchingLossFunction(torch.autograd.Function):
    """fastgrpo::matching_loss without the custom-op dispatcher, for eager mode (torch.compile traces the custom op).
    Returns (loss, stats, rows): the loss as an output of its own, the rest detached."""

    @staticmethod
    def forward(ctx, cond, uncond, target, ref, advantages, old, guidance, clip_low, clip_high, kl_coef, backend):
        stats, rows = _forward(cond, uncond, target, ref, advantages, old, guidance, clip_low, clip_high, kl_coef,
                               backend)
        ctx.save_for_backward(cond, uncond, target, ref, rows)
        ctx.settings = (guidance, kl_coef, backend)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(stats, rows)
        return stats[0], stats, rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_rows):
        cond, uncond, target, ref, rows = ctx.saved_tensors
        needs_cond, needs_uncond = ctx.needs_input_grad[0], uncond is not None and ctx.needs_input_grad[1]
        if grad_loss is None or not (needs_cond or needs_uncond):
            return (None,) * 11
        guidance, kl_coef, backend = ctx.settings
        grad_cond, grad_uncond = _backward(grad_loss, cond, uncond, target, ref, rows, guidance, kl_coef,
                                           needs_cond, needs_uncond, backend)
        return grad_cond, grad_uncond, *(None,) * 9


def matching_loss_fused(cond, uncond, target, ref, advantages, old, guidance, clip_low, clip_high, kl_coef, backend):
    """(loss 0-dim, stats (7,) detached, surrogates (B,) detached) on a fused backend."""
    args = (cond, uncond, target, ref, advantages, old, guidance, clip_low, clip_high, kl_coef, backend)
    if torch.compiler.is_compiling():
        stats, rows = matching_loss_op(*args)
        return stats[0], stats.detach(), rows[:, 0].detach()
    loss, stats, rows = MatchingLossFunction.apply(*args)
    return loss, stats, rows[:, 0]
