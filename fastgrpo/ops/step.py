"""Sampler-step log-prob and sampling step on the fused backends (Triton, C++), as torch custom ops.

`fastgrpo::step_logprob` and `fastgrpo::step_sample` take the model outputs, latents and a (B, 5) float64 step
table (`reference.ddim_coefficients`, `reference.flow_sde_coefficients`): the kernels know no sampler, only the
affine-Gaussian step the table describes, so DDIM and the flow-matching SDE share them. The ops carry fake (meta)
and autograd registrations so they work under torch.compile(fullgraph=True) and pass torch.library.opcheck.
The backend name is an op argument.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastgrpo.ops.dispatch import cpp_kernels, triton_kernels


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _forward(model_output, uncond_output, sample, target, table, guidance_scale, reduction, has_noise,
             save_residual, backend):
    """(log_prob, prev_sample or None, residual or None) in the math dtype. target is prev_sample, or the noise
    when has_noise; save_residual keeps prev_sample - mean, all the backward needs."""
    sum_reduction = reduction == "sum"
    if backend == "cpp":  # converts dtypes and layouts itself
        return tuple(cpp_kernels()[0].step_logprob_forward(model_output, uncond_output, sample, target, table,
                                                           guidance_scale, sum_reduction, has_noise, save_residual))
    return triton_kernels()[0].step_logprob_forward(
        model_output, uncond_output, sample, target, table, guidance=guidance_scale, sum_reduction=sum_reduction,
        has_noise=has_noise, save_residual=save_residual,
        compute_dtype=compute_dtype(model_output, uncond_output, sample, target))


def _backward(grad_out, residual, table, guidance_scale, reduction, has_uncond, needs, backend):
    """Gradients for (model_output, uncond_output, sample, prev_sample) in the residual's dtype, from the forward's
    residual alone; None where not needed."""
    sum_reduction = reduction == "sum"
    needs = [bool(need) for need in needs]
    if backend == "cpp":
        return tuple(cpp_kernels()[0].step_logprob_backward(grad_out, residual, table, guidance_scale, sum_reduction,
                                                            has_uncond, needs))
    return triton_kernels()[0].step_logprob_backward(grad_out.to(residual.dtype), residual, table,
                                                     guidance=guidance_scale, sum_reduction=sum_reduction,
                                                     has_uncond=has_uncond, needs=tuple(needs))


# ------------------------------------------------------------------------------------------ fastgrpo::step_logprob


@torch.library.custom_op("fastgrpo::step_logprob", mutates_args=())
def step_logprob_op(model_output: torch.Tensor, uncond_output: torch.Tensor | None, sample: torch.Tensor,
                    prev_sample: torch.Tensor, table: torch.Tensor, guidance_scale: float, reduction: str,
                    backend: str, save_residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_prob (B,), residual): the residual prev_sample - mean (B, ...) in the math dtype when save_residual
    (the backward needs nothing else), else an empty tensor."""
    log_prob, _, residual = _forward(model_output, uncond_output, sample, prev_sample, table, guidance_scale,
                                     reduction, False, save_residual, backend)
    return log_prob, (residual if residual is not None else log_prob.new_empty((0,)))


@step_logprob_op.register_fake
def _(model_output, uncond_output, sample, prev_sample, table, guidance_scale, reduction, backend, save_residual):
    dtype = compute_dtype(model_output, uncond_output, sample, prev_sample)
    residual_shape = model_output.shape if save_residual else (0,)
    return (model_output.new_empty((model_output.shape[0],), dtype=dtype),
            model_output.new_empty(residual_shape, dtype=dtype))


@torch.library.custom_op("fastgrpo::step_logprob_backward", mutates_args=())
def step_logprob_backward_op(grad_out: torch.Tensor, residual: torch.Tensor, table: torch.Tensor,
                             guidance_scale: float, reduction: str, has_uncond: bool, needs: list[bool],
                             backend: str) -> list[torch.Tensor]:
    grads = _backward(grad_out, residual, table, guidance_scale, reduction, has_uncond, needs, backend)
    return [g if g is not None else residual.new_empty((0,)) for g in grads]


@step_logprob_backward_op.register_fake
def _(grad_out, residual, table, guidance_scale, reduction, has_uncond, needs, backend):
    return [torch.empty_like(residual) if need and (k != 1 or has_uncond) else residual.new_empty((0,))
            for k, need in enumerate(needs)]


def _logprob_setup(ctx, inputs, output):
    model_output, uncond_output, sample, prev_sample, table = inputs[:5]
    ctx.save_for_backward(output[1], table)
    ctx.mark_non_differentiable(output[1])
    ctx.settings = inputs[5:8]  # guidance_scale, reduction, backend
    ctx.has_uncond = uncond_output is not None
    ctx.dtypes = [None if t is None else t.dtype for t in (model_output, uncond_output, sample, prev_sample)]


def _logprob_backward(ctx, grad_out, _grad_residual):
    residual, table = ctx.saved_tensors
    guidance_scale, reduction, backend = ctx.settings
    needs = [ctx.needs_input_grad[k] and ctx.dtypes[k] is not None for k in range(4)]
    if not any(needs):
        return (None,) * 9
    if residual.numel() == 0:
        raise RuntimeError("fastgrpo::step_logprob: backward needs the residual; call it with save_residual=True")
    grads = step_logprob_backward_op(grad_out, residual, table, guidance_scale, reduction, ctx.has_uncond, needs,
                                     backend)
    grads = [g.to(dtype) if need else None for g, need, dtype in zip(grads, needs, ctx.dtypes)]
    return (*grads, None, None, None, None, None)


step_logprob_op.register_autograd(_logprob_backward, setup_context=_logprob_setup)


# ------------------------------------------------------------------------------------------ fastgrpo::step_sample


@torch.library.custom_op("fastgrpo::step_sample", mutates_args=())
def step_sample_op(model_output: torch.Tensor, uncond_output: torch.Tensor | None, sample: torch.Tensor,
                   noise: torch.Tensor, table: torch.Tensor, guidance_scale: float, reduction: str,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    log_prob, prev_sample, _ = _forward(model_output, uncond_output, sample, noise, table, guidance_scale, reduction,
                                        True, False, backend)
    return prev_sample, log_prob


@step_sample_op.register_fake
def _(model_output, uncond_output, sample, noise, table, guidance_scale, reduction, backend):
    dtype = compute_dtype(model_output, uncond_output, sample, noise)
    return (torch.empty_like(model_output, dtype=dtype),
            model_output.new_empty((model_output.shape[0],), dtype=dtype))


def _sample_setup(ctx, inputs, output):
    model_output, uncond_output, sample, noise, table, guidance_scale, reduction, _ = inputs
    ctx.save_for_backward(noise, table)
    ctx.dtype = compute_dtype(model_output, uncond_output, sample, noise)
    ctx.has_uncond, ctx.guidance_scale = uncond_output is not None, guidance_scale
    ctx.scale = 1.0 if reduction == "sum" else 1.0 / model_output[0].numel()
    ctx.dtypes = [None if t is None else t.dtype for t in (model_output, uncond_output, sample, noise)]


def _sample_backward(ctx, grad_prev, grad_log_prob):
    """prev = coef_x x + coef_e guided + std noise; log p = -scale precision sum(std^2 noise^2) + offset
    (independent of the model output analytically: prev - mean is std * noise)."""
    noise, table = ctx.saved_tensors
    coef_x, coef_e, std, precision = table.to(ctx.dtype).unbind(1)[:4]
    shape = (-1,) + (1,) * (noise.dim() - 1)
    grad_prev = torch.zeros_like(noise, dtype=ctx.dtype) if grad_prev is None else grad_prev
    d_guided = coef_e.view(shape) * grad_prev
    g = ctx.guidance_scale if ctx.has_uncond else 1.0
    grad_noise = std.view(shape) * grad_prev
    if grad_log_prob is not None:
        weight = (ctx.scale * 2.0 * precision * std**2).view(shape)
        grad_noise = grad_noise - weight * noise.to(ctx.dtype) * grad_log_prob.view(shape)
    grads = [g * d_guided, (1.0 - g) * d_guided if ctx.has_uncond else None, coef_x.view(shape) * grad_prev,
             grad_noise]
    grads = [None if grad is None or dtype is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)]
    return (*grads, None, None, None, None)


step_sample_op.register_autograd(_sample_backward, setup_context=_sample_setup)


# ------------------------------------------------------------------------------------------ eager fast path


class StepLogprobFunction(torch.autograd.Function):
    """The same computation as fastgrpo::step_logprob without the custom-op dispatcher (about 0.1 ms less per
    forward+backward, which matters at SD shapes). Used in eager mode; torch.compile traces the custom op."""

    @staticmethod
    def forward(ctx, model_output, uncond_output, sample, prev_sample, table, guidance_scale, reduction, backend):
        log_prob, _, residual = _forward(model_output, uncond_output, sample, prev_sample, table, guidance_scale,
                                         reduction, False, True, backend)
        ctx.save_for_backward(residual, table)
        ctx.settings = (guidance_scale, reduction, backend)
        ctx.inputs = [None if t is None else t.dtype for t in (model_output, uncond_output, sample, prev_sample)]
        return log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        residual, table = ctx.saved_tensors
        guidance_scale, reduction, backend = ctx.settings
        needs = [ctx.needs_input_grad[k] and ctx.inputs[k] is not None for k in range(4)]
        grads = _backward(grad_out, residual, table, guidance_scale, reduction, ctx.inputs[1] is not None, needs,
                          backend)
        grads = [g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.inputs)]
        return (*grads, None, None, None, None)


def step_logprob_fused(model_output, uncond_output, sample, prev_sample, table, guidance_scale, reduction, backend):
    """The log-prob on a fused backend. With a gradient to track, the forward also writes the residual
    prev_sample - mean and the backward reads only that (one tensor instead of the four inputs)."""
    compiling = torch.compiler.is_compiling()
    if backend == "cpp" and not compiling:  # forward and backward wired in C++, which checks for a gradient itself
        return cpp_kernels()[0].step_logprob_autograd(model_output, uncond_output, sample, prev_sample, table,
                                                      guidance_scale, reduction == "sum")
    args = (model_output, uncond_output, sample, prev_sample, table, guidance_scale, reduction, backend)
    track = torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad
                                         or prev_sample.requires_grad
                                         or (uncond_output is not None and uncond_output.requires_grad))
    if compiling:
        return step_logprob_op(*args, track)[0]
    if not track:
        return _forward(*args[:7], False, False, backend)[0]
    return StepLogprobFunction.apply(*args)
