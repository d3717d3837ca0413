"""The negative-aware fine-tuning loss (DiffusionNFT) on the fused backends (Triton, C++), as torch custom ops.

Forward (one launch): per row the sums over its N elements of the positive and negative predictions' squared and
absolute errors to the target (each scaled by the row's x0 factor), of (guided - old)^2 and of (guided - ref)^2;
then per row the term and its two gradient coefficients, and the (3,) statistics [loss, deviation, kl] over the
rows. It returns the statistics and a (B, 2) table [f_pos, f_neg] per row:
    d loss / d guided = (2 / N) (f_pos (positive - target) - f_neg (negative - target) + kl_coef / B (guided - ref))
with f_pos = m r c^2 / (w_pos B), f_neg = m (1 - r) c^2 / (w_neg B) (w the detached adaptive weights). Backward (one
launch) recomputes guided, positive and negative from the inputs, so the forward stores no (B, ...) tensor.
"""

from __future__ import annotations

import torch

from fastgrpo.ops.dispatch import cpp_kernels, triton_kernels
from fastgrpo.ops.step import compute_dtype


def _ready(dtype, *tensors):
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def _forward(cond, uncond, target, old, ref, advantages, scale, guidance, beta, adv_clip_max, kl_coef, backend):
    dtype = compute_dtype(cond, uncond, target, old, ref, advantages, scale)
    if backend == "triton":
        module, _ = triton_kernels()
        return module.nft_loss_forward(cond, uncond, target, old, ref, advantages, scale, guidance=guidance,
                                       beta=beta, adv_clip_max=adv_clip_max, kl_coef=kl_coef, compute_dtype=dtype)
    module, _ = cpp_kernels()
    return module.nft_loss_forward(*_ready(dtype, cond, uncond, target, old, ref, advantages, scale), guidance, beta,
                                   adv_clip_max, kl_coef)


def _backward(grad_loss, cond, uncond, target, old, ref, rows, guidance, beta, kl_coef, needs_cond, needs_uncond,
              backend):
    """(d loss / d cond or None, d loss / d uncond or None) in the predictions' dtypes."""
    dtype = rows.dtype
    if backend == "triton":
        module, _ = triton_kernels()
        grad_cond, grad_uncond = module.nft_loss_backward(grad_loss, cond, uncond, target, old, ref, rows,
                                                          guidance=guidance, beta=beta, kl_coef=kl_coef,
                                                          needs=(needs_cond, needs_uncond))
    else:
        module, _ = cpp_kernels()
        grad_cond, grad_uncond = module.nft_loss_backward(*_ready(dtype, grad_loss.reshape(1), cond, uncond, target,
                                                                  old, ref, rows), guidance, beta, kl_coef,
                                                          needs_cond, needs_uncond)
    return (grad_cond.to(cond.dtype).view(cond.shape) if needs_cond else None,
            grad_uncond.to(uncond.dtype).view(uncond.shape) if needs_uncond else None)


@torch.library.custom_op("fastgrpo::nft_loss", mutates_args=())
def nft_loss_op(cond: torch.Tensor, uncond: torch.Tensor | None, target: torch.Tensor, old: torch.Tensor,
                ref: torch.Tensor | None, advantages: torch.Tensor, scale: torch.Tensor, guidance: float, beta: float,
                adv_clip_max: float, kl_coef: float, backend: str) -> list[torch.Tensor]:
    stats, rows = _forward(cond, uncond, target, old, ref, advantages, scale, guidance, beta, adv_clip_max, kl_coef,
                           backend)
    return [stats, rows]


@nft_loss_op.register_fake
def _(cond, uncond, target, old, ref, advantages, scale, guidance, beta, adv_clip_max, kl_coef, backend):
    dtype = compute_dtype(cond, uncond, target, old, ref, advantages, scale)
    return [cond.new_empty((3,), dtype=dtype), cond.new_empty((cond.shape[0], 2), dtype=dtype)]


@torch.library.custom_op("fastgrpo::nft_loss_backward", mutates_args=())
def nft_loss_backward_op(grad_loss: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                         target: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, rows: torch.Tensor,
                         guidance: float, beta: float, kl_coef: float, needs_cond: bool, needs_uncond: bool,
                         backend: str) -> list[torch.Tensor]:
    grad_cond, grad_uncond = _backward(grad_loss, cond, uncond, target, old, ref, rows, guidance, beta, kl_coef,
                                       needs_cond, needs_uncond, backend)
    empty = cond.new_empty((0,))
    return [grad_cond if grad_cond is not None else empty, grad_uncond if grad_uncond is not None else empty]


@nft_loss_backward_op.register_fake
def _(grad_loss, cond, uncond, target, old, ref, rows, guidance, beta, kl_coef, needs_cond, needs_uncond, backend):
    return [torch.empty_like(cond) if needs_cond else cond.new_empty((0,)),
            torch.empty_like(uncond) if needs_uncond and uncond is not None else cond.new_empty((0,))]


def _setup(ctx, inputs, output):
    cond, uncond, target, old, ref = inputs[:5]
    ctx.save_for_backward(cond, uncond, target, old, ref, output[1])
    ctx.settings = (inputs[7], inputs[8], inputs[10], inputs[11])  # guidance, beta, kl_coef, backend


def _op_backward(ctx, grad_outputs):
    cond, uncond, target, old, ref, rows = ctx.saved_tensors
    guidance, beta, kl_coef, backend = ctx.settings
    needs_cond, needs_uncond = ctx.needs_input_grad[0], uncond is not None and ctx.needs_input_grad[1]
    grad_cond = grad_uncond = None
    if needs_cond or needs_uncond:
        grads = nft_loss_backward_op(grad_outputs[0][0], cond, uncond, target, old, ref, rows, guidance, beta,
                                     kl_coef, needs_cond, needs_uncond, backend)
        grad_cond = grads[0] if needs_cond else None
        grad_uncond = grads[1] if needs_uncond else None
    return grad_cond, grad_uncond, *(None,) * 10


nft_loss_op.register_autograd(_op_backward, setup_context=_setup)


class NFTLossFunction(torch.autograd.Function):
    """fastgrpo::nft_loss without the custom-op dispatcher, for eager mode (torch.compile traces the custom op).
    Returns (loss, stats): the loss as an output of its own, the statistics detached."""

    @staticmethod
    def forward(ctx, cond, uncond, target, old, ref, advantages, scale, guidance, beta, adv_clip_max, kl_coef,
                backend):
        stats, rows = _forward(cond, uncond, target, old, ref, advantages, scale, guidance, beta, adv_clip_max,
                               kl_coef, backend)
        ctx.save_for_backward(cond, uncond, target, old, ref, rows)
        ctx.settings = (guidance, beta, kl_coef, backend)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(stats)
        return stats[0], stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        cond, uncond, target, old, ref, rows = ctx.saved_tensors
        needs_cond, needs_uncond = ctx.needs_input_grad[0], uncond is not None and ctx.needs_input_grad[1]
        if grad_loss is None or not (needs_cond or needs_uncond):
            return (None,) * 12
        guidance, beta, kl_coef, backend = ctx.settings
        grad_cond, grad_uncond = _backward(grad_loss, cond, uncond, target, old, ref, rows, guidance, beta, kl_coef,
                                           needs_cond, needs_uncond, backend)
        return grad_cond, grad_uncond, *(None,) * 10


def nft_loss_fused(cond, uncond, target, old, ref, advantages, scale, guidance, beta, adv_clip_max, kl_coef,
                   backend):
    """(loss 0-dim, stats (3,) detached) on a fused backend."""
    args = (cond, uncond, target, old, ref, advantages, scale, guidance, beta, adv_clip_max, kl_coef, backend)
    if torch.compiler.is_compiling():
        stats, _ = nft_loss_op(*args)
        return stats[0], stats.detach()
    return NFTLossFunction.apply(*args)
