"""DDIM-step log-prob and sampling step on the fused backends (Triton, C++), as torch custom ops.

`fastgrpo::ddim_logprob` and `fastgrpo::ddim_step` take the model outputs, latents and per-sample alphas; the
kernels derive the DDIM coefficients per sample themselves (no extra launches). The ops carry fake (meta) and
autograd registrations so they work under torch.compile(fullgraph=True) and pass torch.library.opcheck.
The backend name is an op argument.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from fastgrpo.ops.dispatch import cpp_kernels, triton_kernels

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def step_coefficients(alpha_prod_t, alpha_prod_t_prev, *, eta, prediction_type, dtype):
    """Per-sample (coef_x, coef_e, std), (B,) in `dtype`: mean = coef_x * x_t + coef_e * guided_output."""
    alpha_t = alpha_prod_t.detach().to(dtype)
    alpha_prev = alpha_prod_t_prev.detach().to(dtype)
    beta_t = 1.0 - alpha_t
    std = eta * ((1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev)).sqrt()
    direction = (1.0 - alpha_prev - std**2).sqrt()
    if prediction_type == "epsilon":
        coef_x = alpha_prev.sqrt() / alpha_t.sqrt()
        coef_e = direction - alpha_prev.sqrt() * beta_t.sqrt() / alpha_t.sqrt()
    else:  # v_prediction
        coef_x = alpha_prev.sqrt() * alpha_t.sqrt() + direction * beta_t.sqrt()
        coef_e = direction * alpha_t.sqrt() - alpha_prev.sqrt() * beta_t.sqrt()
    return coef_x, coef_e, std


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _ready(dtype, *tensors):
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def _forward(model_output, uncond_output, sample, target, alpha_t, alpha_prev, eta, guidance_scale,
             prediction_type, reduction, has_noise, save_residual, backend):
    """(log_prob, prev_sample or None, residual or None) in the math dtype. target is prev_sample, or the noise
    when has_noise; save_residual keeps prev_sample - mean, all the backward needs."""
    v_prediction, sum_reduction = prediction_type == "v_prediction", reduction == "sum"
    if backend == "cpp":  # converts dtypes and layouts itself
        return tuple(cpp_kernels()[0].ddim_logprob_forward(
            model_output, uncond_output, sample, target, alpha_t, alpha_prev, eta, guidance_scale, v_prediction,
            sum_reduction, has_noise, save_residual))
    dtype = compute_dtype(model_output, uncond_output, sample, target)
    alpha_t, alpha_prev = _ready(dtype, alpha_t, alpha_prev)
    return triton_kernels()[0].ddim_logprob_forward(model_output, uncond_output, sample, target, alpha_t, alpha_prev,
                                                    eta=eta, guidance=guidance_scale, v_prediction=v_prediction,
                                                    sum_reduction=sum_reduction, has_noise=has_noise,
                                                    save_residual=save_residual, compute_dtype=dtype)


def _backward(grad_out, residual, alpha_t, alpha_prev, eta, guidance_scale, prediction_type, reduction, has_uncond,
              needs, backend):
    """Gradients for (model_output, uncond_output, sample, prev_sample) in the residual's dtype, from the forward's
    residual alone; None where not needed."""
    v_prediction, sum_reduction = prediction_type == "v_prediction", reduction == "sum"
    needs = [bool(need) for need in needs]
    if backend == "cpp":
        return tuple(cpp_kernels()[0].ddim_logprob_backward(grad_out, residual, alpha_t, alpha_prev, eta,
                                                            guidance_scale, v_prediction, sum_reduction, has_uncond,
                                                            needs))
    alpha_t, alpha_prev = _ready(residual.dtype, alpha_t, alpha_prev)
    return triton_kernels()[0].ddim_logprob_backward(grad_out.to(residual.dtype), residual, alpha_t, alpha_prev,
                                                     eta=eta, guidance=guidance_scale, v_prediction=v_prediction,
                                                     sum_reduction=sum_reduction, has_uncond=has_uncond,
                                                     needs=tuple(needs))


# ------------------------------------------------------------------------------------------ fastgrpo::ddim_logprob


@torch.library.custom_op("fastgrpo::ddim_logprob", mutates_args=())
def ddim_logprob_op(model_output: torch.Tensor, uncond_output: torch.Tensor | None, sample: torch.Tensor,
                    prev_sample: torch.Tensor, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor,
                    eta: float, guidance_scale: float, prediction_type: str, reduction: str, backend: str,
                    save_residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_prob (B,), residual): the residual prev_sample - mean (B, ...) in the math dtype when save_residual
    (the backward needs nothing else), else an empty tensor."""
    log_prob, _, residual = _forward(model_output, uncond_output, sample, prev_sample, alpha_prod_t,
                                     alpha_prod_t_prev, eta, guidance_scale, prediction_type, reduction, False,
                                     save_residual, backend)
    return log_prob, (residual if residual is not None else log_prob.new_empty((0,)))


@ddim_logprob_op.register_fake
def _(model_output, uncond_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev, eta, guidance_scale,
      prediction_type, reduction, backend, save_residual):
    dtype = compute_dtype(model_output, uncond_output, sample, prev_sample)
    residual_shape = model_output.shape if save_residual else (0,)
    return (model_output.new_empty((model_output.shape[0],), dtype=dtype),
            model_output.new_empty(residual_shape, dtype=dtype))


@torch.library.custom_op("fastgrpo::ddim_logprob_backward", mutates_args=())
def ddim_logprob_backward_op(grad_out: torch.Tensor, residual: torch.Tensor, alpha_prod_t: torch.Tensor,
                             alpha_prod_t_prev: torch.Tensor, eta: float, guidance_scale: float,
                             prediction_type: str, reduction: str, has_uncond: bool, needs: list[bool],
                             backend: str) -> list[torch.Tensor]:
    grads = _backward(grad_out, residual, alpha_prod_t, alpha_prod_t_prev, eta, guidance_scale, prediction_type,
                      reduction, has_uncond, needs, backend)
    return [g if g is not None else residual.new_empty((0,)) for g in grads]


@ddim_logprob_backward_op.register_fake
def _(grad_out, residual, alpha_prod_t, alpha_prod_t_prev, eta, guidance_scale, prediction_type, reduction,
      has_uncond, needs, backend):
    return [torch.empty_like(residual) if need and (k != 1 or has_uncond) else residual.new_empty((0,))
            for k, need in enumerate(needs)]


def _logprob_setup(ctx, inputs, output):
    model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev = inputs[:6]
    ctx.save_for_backward(output[1], alpha_t, alpha_prev)
    ctx.mark_non_differentiable(output[1])
    ctx.settings = inputs[6:11]  # eta, guidance_scale, prediction_type, reduction, backend
    ctx.has_uncond = uncond_output is not None
    ctx.dtypes = [None if t is None else t.dtype for t in (model_output, uncond_output, sample, prev_sample)]


def _logprob_backward(ctx, grad_out, _grad_residual):
    residual, alpha_t, alpha_prev = ctx.saved_tensors
    eta, guidance_scale, prediction_type, reduction, backend = ctx.settings
    needs = [ctx.needs_input_grad[k] and ctx.dtypes[k] is not None for k in range(4)]
    if not any(needs):
        return (None,) * 12
    if residual.numel() == 0:
        raise RuntimeError("fastgrpo::ddim_logprob: backward needs the residual; call it with save_residual=True")
    grads = ddim_logprob_backward_op(grad_out, residual, alpha_t, alpha_prev, eta, guidance_scale, prediction_type,
                                     reduction, ctx.has_uncond, needs, backend)
    grads = [g.to(dtype) if need else None for g, need, dtype in zip(grads, needs, ctx.dtypes)]
    return (*grads, None, None, None, None, None, None, None, None)


ddim_logprob_op.register_autograd(_logprob_backward, setup_context=_logprob_setup)


# ------------------------------------------------------------------------------------------ fastgrpo::ddim_step


@torch.library.custom_op("fastgrpo::ddim_step", mutates_args=())
def ddim_step_op(model_output: torch.Tensor, uncond_output: torch.Tensor | None, sample: torch.Tensor,
                 noise: torch.Tensor, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, eta: float,
                 guidance_scale: float, prediction_type: str, reduction: str,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    log_prob, prev_sample, _ = _forward(model_output, uncond_output, sample, noise, alpha_prod_t, alpha_prod_t_prev,
                                        eta, guidance_scale, prediction_type, reduction, True, False, backend)
    return prev_sample, log_prob


@ddim_step_op.register_fake
def _(model_output, uncond_output, sample, noise, alpha_prod_t, alpha_prod_t_prev, eta, guidance_scale,
      prediction_type, reduction, backend):
    dtype = compute_dtype(model_output, uncond_output, sample, noise)
    return (torch.empty_like(model_output, dtype=dtype),
            model_output.new_empty((model_output.shape[0],), dtype=dtype))


def _step_setup(ctx, inputs, output):
    model_output, uncond_output, sample, noise, alpha_t, alpha_prev, eta, guidance_scale, prediction_type, reduction, \
        _ = inputs
    ctx.save_for_backward(noise, alpha_t, alpha_prev)
    ctx.eta, ctx.prediction_type = eta, prediction_type
    ctx.dtype = compute_dtype(model_output, uncond_output, sample, noise)
    ctx.has_uncond, ctx.guidance_scale = uncond_output is not None, guidance_scale
    ctx.scale = 1.0 if reduction == "sum" else 1.0 / model_output[0].numel()
    ctx.dtypes = [None if t is None else t.dtype for t in (model_output, uncond_output, sample, noise)]


def _step_backward(ctx, grad_prev, grad_log_prob):
    """prev = coef_x x + coef_e guided + std noise; log p = -scale sum(noise^2)/2 + offset (independent of the
    model output analytically: prev - mean is std * noise)."""
    noise, alpha_t, alpha_prev = ctx.saved_tensors
    coef_x, coef_e, std = step_coefficients(alpha_t, alpha_prev, eta=ctx.eta, prediction_type=ctx.prediction_type,
                                            dtype=ctx.dtype)
    shape = (-1,) + (1,) * (noise.dim() - 1)
    grad_prev = torch.zeros_like(noise, dtype=coef_x.dtype) if grad_prev is None else grad_prev
    d_guided = coef_e.view(shape) * grad_prev
    g = ctx.guidance_scale if ctx.has_uncond else 1.0
    grad_noise = std.view(shape) * grad_prev
    if grad_log_prob is not None:
        grad_noise = grad_noise - ctx.scale * noise.to(coef_x.dtype) * grad_log_prob.view(shape)
    grads = [g * d_guided, (1.0 - g) * d_guided if ctx.has_uncond else None, coef_x.view(shape) * grad_prev,
             grad_noise]
    grads = [None if grad is None or dtype is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)]
    return (*grads, None, None, None, None, None, None, None)


ddim_step_op.register_autograd(_step_backward, setup_context=_step_setup)


# ------------------------------------------------------------------------------------------ eager fast path


class DdimLogprobFunction(torch.autograd.Function):
    """The same computation as fastgrpo::ddim_logprob without the custom-op dispatcher (about 0.1 ms less per
    forward+backward, which matters at SD shapes). Used in eager mode; torch.compile traces the custom op."""

    @staticmethod
    def forward(ctx, model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
                prediction_type, reduction, backend):
        log_prob, _, residual = _forward(model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta,
                                         guidance_scale, prediction_type, reduction, False, True, backend)
        ctx.save_for_backward(residual, alpha_t, alpha_prev)
        ctx.settings = (eta, guidance_scale, prediction_type, reduction, backend)
        ctx.inputs = [None if t is None else t.dtype for t in (model_output, uncond_output, sample, prev_sample)]
        return log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        residual, alpha_t, alpha_prev = ctx.saved_tensors
        eta, guidance_scale, prediction_type, reduction, backend = ctx.settings
        needs = [ctx.needs_input_grad[k] and ctx.inputs[k] is not None for k in range(4)]
        grads = _backward(grad_out, residual, alpha_t, alpha_prev, eta, guidance_scale, prediction_type, reduction,
                          ctx.inputs[1] is not None, needs, backend)
        grads = [g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.inputs)]
        return (*grads, None, None, None, None, None, None, None)


def ddim_logprob_fused(model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
                       prediction_type, reduction, backend):
    """The log-prob on a fused backend. With a gradient to track, the forward also writes the residual
    prev_sample - mean and the backward reads only that (one tensor instead of the four inputs)."""
    compiling = torch.compiler.is_compiling()
    if backend == "cpp" and not compiling:  # forward and backward wired in C++, which checks for a gradient itself
        return cpp_kernels()[0].ddim_logprob_autograd(
            model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
            prediction_type == "v_prediction", reduction == "sum")
    args = (model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
            prediction_type, reduction, backend)
    track = torch.is_grad_enabled() and (model_output.requires_grad or sample.requires_grad
                                         or prev_sample.requires_grad
                                         or (uncond_output is not None and uncond_output.requires_grad))
    if compiling:
        return ddim_logprob_op(*args, track)[0]
    if not track:
        return _forward(*args[:10], False, False, backend)[0]
    return DdimLogprobFunction.apply(*args)
