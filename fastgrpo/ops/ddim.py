"""DDIM-step log-prob and sampling step on the fused backends (Triton, C++), as torch custom ops.

`fastgrpo::ddim_logprob` and `fastgrpo::ddim_step` take the model outputs, latents and per-sample alphas; the
kernels derive the DDIM coefficients per sample themselves (no extra launches). The ops carry fake (meta) and
autograd registrations so they work under torch.compile(fullgraph=True) and pass torch.library.opcheck.
The backend name is an op argument.
"""

from __future__ import annotations

import math

import torch

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
             prediction_type, reduction, has_noise, backend):
    v_prediction, sum_reduction = prediction_type == "v_prediction", reduction == "sum"
    if backend == "cpp":  # converts dtypes and layouts itself
        log_prob, prev = cpp_kernels()[0].ddim_logprob_forward(model_output, uncond_output, sample, target, alpha_t,
                                                               alpha_prev, eta, guidance_scale, v_prediction,
                                                               sum_reduction, has_noise)
        return log_prob, (prev if has_noise else None)
    dtype = compute_dtype(model_output, uncond_output, sample, target)
    alpha_t, alpha_prev = _ready(dtype, alpha_t, alpha_prev)
    return triton_kernels()[0].ddim_logprob_forward(model_output, uncond_output, sample, target, alpha_t, alpha_prev,
                                                    eta=eta, guidance=guidance_scale, v_prediction=v_prediction,
                                                    sum_reduction=sum_reduction, has_noise=has_noise,
                                                    compute_dtype=dtype)


def _backward(grad_out, model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
              prediction_type, reduction, needs, backend):
    """Gradients for (model_output, uncond_output, sample, prev_sample) in their own dtypes; None where not needed."""
    v_prediction, sum_reduction = prediction_type == "v_prediction", reduction == "sum"
    if backend == "cpp":
        grads = cpp_kernels()[0].ddim_logprob_backward(grad_out, model_output, uncond_output, sample, prev_sample,
                                                       alpha_t, alpha_prev, eta, guidance_scale, v_prediction,
                                                       sum_reduction, needs[1], needs[2], needs[3])
        return tuple(g if g.numel() and need else None for g, need in zip(grads, needs))
    dtype = compute_dtype(model_output, uncond_output, sample, prev_sample)
    alpha_t, alpha_prev = _ready(dtype, alpha_t, alpha_prev)
    grads = triton_kernels()[0].ddim_logprob_backward(grad_out.to(dtype), model_output, uncond_output, sample,
                                                      prev_sample, alpha_t, alpha_prev, eta=eta,
                                                      guidance=guidance_scale, v_prediction=v_prediction,
                                                      sum_reduction=sum_reduction, needs=tuple(needs),
                                                      compute_dtype=dtype)
    inputs = (model_output, uncond_output, sample, prev_sample)
    return tuple(g.to(x.dtype) if g is not None else None for g, x in zip(grads, inputs))


# ------------------------------------------------------------------------------------------ fastgrpo::ddim_logprob


@torch.library.custom_op("fastgrpo::ddim_logprob", mutates_args=())
def ddim_logprob_op(model_output: torch.Tensor, uncond_output: torch.Tensor | None, sample: torch.Tensor,
                    prev_sample: torch.Tensor, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor,
                    eta: float, guidance_scale: float, prediction_type: str, reduction: str,
                    backend: str) -> torch.Tensor:
    return _forward(model_output, uncond_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev, eta,
                    guidance_scale, prediction_type, reduction, False, backend)[0]


@ddim_logprob_op.register_fake
def _(model_output, uncond_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev, eta, guidance_scale,
      prediction_type, reduction, backend):
    dtype = compute_dtype(model_output, uncond_output, sample, prev_sample)
    return model_output.new_empty((model_output.shape[0],), dtype=dtype)


@torch.library.custom_op("fastgrpo::ddim_logprob_backward", mutates_args=())
def ddim_logprob_backward_op(grad_out: torch.Tensor, model_output: torch.Tensor, uncond_output: torch.Tensor | None,
                             sample: torch.Tensor, prev_sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                             alpha_prod_t_prev: torch.Tensor, eta: float, guidance_scale: float,
                             prediction_type: str, reduction: str, needs: list[bool],
                             backend: str) -> list[torch.Tensor]:
    grads = _backward(grad_out, model_output, uncond_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev,
                      eta, guidance_scale, prediction_type, reduction, needs, backend)
    return [g if g is not None and need else model_output.new_empty((0,)) for g, need in zip(grads, needs)]


@ddim_logprob_backward_op.register_fake
def _(grad_out, model_output, uncond_output, sample, prev_sample, alpha_prod_t, alpha_prod_t_prev, eta,
      guidance_scale, prediction_type, reduction, needs, backend):
    inputs = (model_output, uncond_output, sample, prev_sample)
    return [torch.empty_like(x) if need and x is not None else model_output.new_empty((0,))
            for x, need in zip(inputs, needs)]


def _logprob_setup(ctx, inputs, output):
    model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev = inputs[:6]
    ctx.save_for_backward(model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev)
    ctx.settings = inputs[6:]  # eta, guidance_scale, prediction_type, reduction, backend


def _logprob_backward(ctx, grad_out):
    model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev = ctx.saved_tensors
    eta, guidance_scale, prediction_type, reduction, backend = ctx.settings
    needs = [ctx.needs_input_grad[0], uncond_output is not None and ctx.needs_input_grad[1],
             ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
    if not any(needs):
        return (None,) * 11
    grads = ddim_logprob_backward_op(grad_out, model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev,
                                     eta, guidance_scale, prediction_type, reduction, needs, backend)
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads, None, None, None, None, None, None, None)


ddim_logprob_op.register_autograd(_logprob_backward, setup_context=_logprob_setup)


# ------------------------------------------------------------------------------------------ fastgrpo::ddim_step


@torch.library.custom_op("fastgrpo::ddim_step", mutates_args=())
def ddim_step_op(model_output: torch.Tensor, uncond_output: torch.Tensor | None, sample: torch.Tensor,
                 noise: torch.Tensor, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, eta: float,
                 guidance_scale: float, prediction_type: str, reduction: str,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    log_prob, prev_sample = _forward(model_output, uncond_output, sample, noise, alpha_prod_t, alpha_prod_t_prev,
                                     eta, guidance_scale, prediction_type, reduction, True, backend)
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
        ctx.save_for_backward(model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev)
        ctx.settings = (eta, guidance_scale, prediction_type, reduction, backend)
        return _forward(model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
                        prediction_type, reduction, False, backend)[0]

    @staticmethod
    def backward(ctx, grad_out):
        model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], uncond_output is not None and ctx.needs_input_grad[1],
                 ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        eta, guidance_scale, prediction_type, reduction, backend = ctx.settings
        grads = _backward(grad_out, model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta,
                          guidance_scale, prediction_type, reduction, needs, backend)
        return (*grads, None, None, None, None, None, None, None)


def ddim_logprob_fused(model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
                       prediction_type, reduction, backend):
    args = (model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
            prediction_type, reduction, backend)
    if torch.compiler.is_compiling():
        return ddim_logprob_op(*args)
    if backend == "cpp":  # forward and backward wired in C++
        return cpp_kernels()[0].ddim_logprob_autograd(
            model_output, uncond_output, sample, prev_sample, alpha_t, alpha_prev, eta, guidance_scale,
            prediction_type == "v_prediction", reduction == "sum")
    return DdimLogprobFunction.apply(*args)
