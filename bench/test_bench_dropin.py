"""The drop-in step ops against eager implementations in the peers' style, side by side in one run.

docs/examples replaces ddpo-pytorch's `ddim_step_with_logprob` and flow_grpo's `sde_step_with_logprob` with
fastgrpo's ops. The eager functions below compute the same step the way those codebases do (full-tensor elementwise
PyTorch: the predicted x_0 and the direction term for DDIM; the SDE mean in one expression for the flow; then the
Gaussian log-density elementwise and a mean), so the ratio is the speed-up a user of either codebase gets from the
swap. Training is what repeats the log-prob with a gradient, so the forward + backward at a training micro-batch is
the headline: DDIM at SD 1.x's 64x64x4 latent, the flow step at SD3's 64x64x16 (512 px). Ratios come from
`interleaved_medians`; the fused op's pytest-benchmark stats are its own block.

    python -m pytest bench/test_bench_dropin.py --benchmark-only -s
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICE, device_info, interleaved_medians, launches_per_call
from fastgrpo import ops

SHAPES = {"ddim": (16, 4, 64, 64), "flow_sde": (16, 16, 64, 64), "flow_cps": (16, 16, 64, 64)}


def eager_ddim_logprob(model_output, sample, prev_sample, alpha_t, alpha_prev, eta):
    """ddpo-pytorch's arithmetic (epsilon prediction, broadcast (B,) schedule values)."""
    shape = (-1,) + (1,) * (sample.dim() - 1)
    alpha_t, alpha_prev = alpha_t.view(shape), alpha_prev.view(shape)
    beta_t = 1 - alpha_t
    pred_x0 = (sample - beta_t**0.5 * model_output) / alpha_t**0.5
    std = eta * ((1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)) ** 0.5
    mean = alpha_prev**0.5 * pred_x0 + (1 - alpha_prev - std**2) ** 0.5 * model_output
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def eager_flow_logprob(model_output, sample, prev_sample, sigma, sigma_prev, noise_level, sde_type, sigma_max):
    """flow_grpo's arithmetic for both step types (broadcast (B,) sigmas)."""
    shape = (-1,) + (1,) * (sample.dim() - 1)
    sigma, sigma_prev = sigma.view(shape), sigma_prev.view(shape)
    dt = sigma_prev - sigma
    if sde_type == "sde":
        std_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        mean = (sample * (1 + std_t**2 / (2 * sigma) * dt)
                + model_output * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt)
        std = std_t * torch.sqrt(-dt)
        log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    else:
        std_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        mean = ((sample - sigma * model_output) * (1 - sigma_prev)
                + (sample + model_output * (1 - sigma)) * torch.sqrt(sigma_prev**2 - std_t**2))
        log_prob = -((prev_sample - mean) ** 2)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _inputs(name):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shape = SHAPES[name]
    output, sample, prev = (torch.randn(shape, generator=gen, device=DEVICE) for _ in range(3))
    batch = shape[0]
    if name == "ddim":
        alpha_t = torch.linspace(0.1, 0.9, batch, device=DEVICE)
        schedule = (alpha_t, (alpha_t + 0.02).clamp(max=0.999))
    else:
        sigma = torch.linspace(0.2, 1.0, batch, device=DEVICE)
        schedule = (sigma, (sigma - 0.05).clamp(min=0.0))
    return output, sample, prev, schedule


def _runner(fn, output, sample, prev, schedule, backward):
    leaf = output.clone().requires_grad_(backward)

    def run():
        leaf.grad = None
        log_prob = fn(leaf, sample, prev, *schedule)
        if backward:
            log_prob.sum().backward()
    return run


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_dropin_step_logprob(benchmark, name, mode):
    output, sample, prev, schedule = _inputs(name)
    backward = mode == "forward_backward"
    if name == "ddim":
        fused = lambda e, x, p, a, ap: ops.ddim_logprob(e, x, p, a, ap, eta=1.0)  # noqa: E731
        eager = lambda e, x, p, a, ap: eager_ddim_logprob(e, x, p, a, ap, 1.0)  # noqa: E731
        op = "ddim_logprob"
    else:
        sde_type = name.removeprefix("flow_")
        fused = lambda v, x, p, s, sp: ops.flow_sde_logprob(v, x, p, s, sp, noise_level=0.7,  # noqa: E731
                                                            sde_type=sde_type, sigma_max=0.98)
        eager = lambda v, x, p, s, sp: eager_flow_logprob(v, x, p, s, sp, 0.7, sde_type, 0.98)  # noqa: E731
        op = "flow_sde_logprob"
    torch.testing.assert_close(fused(output, sample, prev, *schedule), eager(output, sample, prev, *schedule),
                               rtol=1e-4, atol=1e-4)
    runs = {"fused": _runner(fused, output, sample, prev, schedule, backward),
            "eager": _runner(eager, output, sample, prev, schedule, backward)}
    medians = interleaved_medians(runs, block=21)
    benchmark.pedantic(runs["fused"], rounds=50, warmup_rounds=5, iterations=1)
    speedup = medians["eager"] / medians["fused"]
    benchmark.extra_info.update(device_info(), backend=ops.explain(op, DEVICE)[0], shape=list(SHAPES[name]),
                                eager_s=medians["eager"], fused_interleaved_s=medians["fused"],
                                speedup_vs_peer_style_eager=speedup, **launches_per_call(runs["fused"]))
    print(f"\n{name} {mode}: fused {medians['fused'] * 1e3:.2f} ms, peer-style eager {medians['eager'] * 1e3:.2f} ms,"
          f" {speedup:.1f}x")
