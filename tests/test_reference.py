"""The reference ops against independent math: diffusers' DDIMScheduler, torch.distributions, float64 loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from fastgrpo import ops
from fastgrpo.ops import reference


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests pin down the reference itself (the fused backends are compared with it in test_kernels.py)."""
    monkeypatch.setenv("FASTGRPO_BACKEND", "reference")


def make_scheduler(prediction_type="epsilon", num_steps=10):
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    scheduler.set_timesteps(num_steps)
    # diffusers keeps its alphas in fp32; in fp64 both sides can be compared to 1e-10
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def alphas_for(scheduler, timestep):
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[timestep], alpha_prev, prev


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("step_index", [0, 4, 9])  # 9 = last step: alpha_prev is final_alpha_cumprod
def test_ddim_step_matches_diffusers(prediction_type, eta, step_index):
    scheduler = make_scheduler(prediction_type)
    timestep = int(scheduler.timesteps[step_index])
    gen = torch.Generator().manual_seed(step_index)
    model_output, sample, noise = (torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = scheduler.step(model_output, timestep, sample, eta=eta, variance_noise=noise).prev_sample
    alpha_t, alpha_prev, _ = alphas_for(scheduler, timestep)
    prev_sample, _ = ops.ddim_step(model_output, sample, alpha_t.expand(3).double(), alpha_prev.expand(3).double(),
                                   noise, eta=eta, prediction_type=prediction_type)
    torch.testing.assert_close(prev_sample, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_logprob_matches_torch_distributions(prediction_type):
    scheduler = make_scheduler(prediction_type)
    timestep = int(scheduler.timesteps[3])
    alpha_t, alpha_prev, prev_t = alphas_for(scheduler, timestep)
    gen = torch.Generator().manual_seed(1)
    model_output, sample, prev_sample = (torch.randn(2, 4, 5, 7, generator=gen, dtype=torch.float64)
                                         for _ in range(3))
    # Mean from diffusers with zero noise; std from diffusers' own variance formula.
    mean = scheduler.step(model_output, timestep, sample, eta=1.0,
                          variance_noise=torch.zeros_like(sample)).prev_sample
    std = math.sqrt(float(scheduler._get_variance(timestep, prev_t)))
    expected = torch.distributions.Normal(mean, std).log_prob(prev_sample).mean(dim=(1, 2, 3))
    got = ops.ddim_logprob(model_output, sample, prev_sample, alpha_t.expand(2).double(),
                           alpha_prev.expand(2).double(), eta=1.0, prediction_type=prediction_type)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    summed = ops.ddim_logprob(model_output, sample, prev_sample, alpha_t.expand(2).double(),
                              alpha_prev.expand(2).double(), eta=1.0, prediction_type=prediction_type,
                              reduction="sum")
    torch.testing.assert_close(summed, expected * 4 * 5 * 7, rtol=1e-10, atol=1e-8)


def test_cfg_is_folded_in():
    gen = torch.Generator().manual_seed(2)
    cond, uncond, sample, prev_sample = (torch.randn(3, 4, 6, 6, generator=gen, dtype=torch.float64)
                                         for _ in range(4))
    alpha_t = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)
    alpha_prev = torch.tensor([0.35, 0.6, 0.95], dtype=torch.float64)
    guided = uncond + 7.5 * (cond - uncond)
    expected = ops.ddim_logprob(guided, sample, prev_sample, alpha_t, alpha_prev)
    got = ops.ddim_logprob(cond, sample, prev_sample, alpha_t, alpha_prev, uncond_output=uncond, guidance_scale=7.5)
    torch.testing.assert_close(got, expected)


def test_step_logprob_is_logprob_of_returned_sample():
    gen = torch.Generator().manual_seed(3)
    cond, uncond, sample, noise = (torch.randn(4, 4, 8, 8, generator=gen) for _ in range(4))
    alpha_t, alpha_prev = torch.full((4,), 0.4), torch.full((4,), 0.45)
    prev_sample, log_prob = ops.ddim_step(cond, sample, alpha_t, alpha_prev, noise, uncond_output=uncond,
                                          guidance_scale=5.0)
    assert prev_sample.dtype == log_prob.dtype == torch.float32
    recomputed = ops.ddim_logprob(cond, sample, prev_sample, alpha_t, alpha_prev, uncond_output=uncond,
                                  guidance_scale=5.0)
    assert torch.equal(recomputed, log_prob)
    # Closed form: prev = mean + std * noise, so the elementwise log-density is -noise^2/2 - log(std) - log sqrt(2 pi).
    variance = (1 - 0.45) / (1 - 0.4) * (1 - 0.4 / 0.45)
    closed = (-(noise.double() ** 2) / 2).mean(dim=(1, 2, 3)) - 0.5 * math.log(variance) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob.double(), closed, rtol=1e-5, atol=1e-4)


def test_low_precision_inputs_compute_in_fp32():
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3)]
    alpha_t, alpha_prev = torch.tensor([0.2, 0.7]), torch.tensor([0.25, 0.75])
    exact = ops.ddim_logprob(*[t.double() for t in tensors], alpha_t.double(), alpha_prev.double())
    for dtype in (torch.float16, torch.bfloat16):
        low = [t.to(dtype) for t in tensors]
        got = ops.ddim_logprob(*low, alpha_t, alpha_prev)
        assert got.dtype == torch.float32
        # only the input rounding is lost: the same math on the rounded inputs in fp64 agrees to fp32 precision
        rounded = ops.ddim_logprob(*[t.double() for t in low], alpha_t.double(), alpha_prev.double())
        torch.testing.assert_close(got.double(), rounded, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(rounded, exact, rtol=0, atol=1e-9)  # the rounding itself is visible


def test_logprob_gradcheck():
    gen = torch.Generator().manual_seed(5)
    cond, uncond = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
                    for _ in range(2))
    sample, prev_sample = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    alpha_t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    alpha_prev = torch.tensor([0.4, 0.85], dtype=torch.float64)

    def fn(c, u):
        return ops.ddim_logprob(c, sample, prev_sample, alpha_t, alpha_prev, uncond_output=u, guidance_scale=3.0,
                                prediction_type="v_prediction")

    assert torch.autograd.gradcheck(fn, (cond, uncond))


def advantages_loop(rewards, group_size, std="group", clip=None, eps=1e-8, ddof=1):
    """float64 numpy reference, one group at a time."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        scale = group.std(ddof=ddof) if std == "group" else rewards.std(ddof=ddof)
        out[start:start + group_size] = (group - group.mean()) / (scale + eps)
    return np.clip(out, -clip, clip) if clip is not None else out


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_match_numpy(std, unbiased):
    rewards = torch.randn(24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rewards[8:12] = 0.25  # a group with zero spread
    got = ops.group_advantages(rewards, 4, std=std, unbiased=unbiased)
    expected = advantages_loop(rewards.numpy(), 4, std=std, ddof=1 if unbiased else 0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    if std == "group":
        assert torch.all(got[8:12] == 0)


def test_group_advantages_clip_and_group_ids():
    rewards = torch.tensor([0.0, 0.0, 0.0, 10.0, 1.0, 2.0])
    clipped = ops.group_advantages(rewards[:4], 4, clip=1.2)
    np.testing.assert_allclose(clipped.numpy(), advantages_loop(rewards[:4].numpy(), 4, clip=1.2), rtol=1e-6)
    assert clipped.max().item() == pytest.approx(1.2)
    ids = torch.tensor([1, 0, 1, 0, 1, 0])  # interleaved groups
    by_id = ops.group_advantages(rewards, ids)
    order = torch.tensor([1, 3, 5, 0, 2, 4])
    expected = advantages_loop(rewards[order].numpy(), 3)
    np.testing.assert_allclose(by_id[order].numpy(), expected, rtol=1e-6)


def test_group_advantages_reject_bad_groups():
    with pytest.raises(ValueError, match="group_size"):
        ops.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        ops.group_advantages(torch.zeros(6), 1)


def loss_loop(log_probs, old, adv, clip_range, ref=None, kl_coef=0.0, clip_high=None):
    """float64 per-element reference of the clipped objective and its statistics."""
    terms, kls, ratios = [], [], []
    clip_high = clip_range if clip_high is None else clip_high
    for lp, o, a, r in zip(log_probs, old, adv, ref if ref is not None else [None] * len(adv)):
        ratio = math.exp(lp - o)
        clipped_ratio = min(max(ratio, 1 - clip_range), 1 + clip_high)
        terms.append(max(-a * ratio, -a * clipped_ratio))
        ratios.append(ratio)
        if r is not None:
            kls.append(math.exp(r - lp) - (r - lp) - 1)
    loss = sum(terms) / len(terms) + (kl_coef * sum(kls) / len(kls) if kls else 0.0)
    stats = {"approx_kl": 0.5 * sum((lp - o) ** 2 for lp, o in zip(log_probs, old)) / len(terms),
             "clipfrac": sum(r < 1 - clip_range or r > 1 + clip_high for r in ratios) / len(ratios),
             "ratio_mean": sum(ratios) / len(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return loss, stats


@pytest.mark.parametrize("clip_high", [None, 0.05])
@pytest.mark.parametrize("with_ref", [False, True])
def test_grpo_loss_matches_loop(with_ref, clip_high):
    gen = torch.Generator().manual_seed(7)
    old = torch.randn(33, generator=gen, dtype=torch.float64)
    log_probs = old + 0.05 * torch.randn(33, generator=gen, dtype=torch.float64)
    adv = torch.randn(33, generator=gen, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(33, generator=gen, dtype=torch.float64) if with_ref else None
    loss, stats = ops.grpo_loss(log_probs, old, adv, clip_range=0.02, ref_log_probs=ref, kl_coef=0.3,
                                clip_range_high=clip_high)
    expected_loss, expected_stats = loss_loop(log_probs.tolist(), old.tolist(), adv.tolist(), 0.02,
                                              ref.tolist() if with_ref else None, 0.3, clip_high)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    for name, value in expected_stats.items():
        assert stats[name].item() == pytest.approx(value, rel=1e-12), name
    assert 0 < stats["clipfrac"].item() < 1
    assert ("kl" in stats) == with_ref


def test_grpo_loss_gradient_vanishes_when_clipped():
    old = torch.zeros(4, dtype=torch.float64)
    log_probs = torch.tensor([0.5, -0.5, 0.5, 0.001], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    loss, _ = ops.grpo_loss(log_probs, old, adv, clip_range=0.1)
    loss.backward()
    # entries 0 and 1 are past the clip in the direction their advantage pushes: no gradient
    assert log_probs.grad[0] == 0 and log_probs.grad[1] == 0
    # entry 2 is pushed back (negative advantage, ratio > 1+eps) and entry 3 is inside the range: -A * ratio / M
    assert log_probs.grad[2].item() == pytest.approx(math.exp(0.5) / 4)
    assert log_probs.grad[3].item() == pytest.approx(-math.exp(0.001) / 4)


def test_rejections_name_each_backend_and_why(monkeypatch):
    x = torch.zeros(2, 4, 2, 2)
    alphas = torch.full((2,), 0.5, requires_grad=True)
    with pytest.raises(ops.BackendUnavailableError, match="triton: alpha_prod_t/alpha_prod_t_prev require grad"):
        ops.ddim_logprob(x, x, x, alphas, alphas, backend="triton")
    # auto falls back to the reference, which differentiates the schedule
    ops.ddim_logprob(x, x, x + 1, alphas, alphas.detach() + 0.1).sum().backward()
    assert alphas.grad is not None
    monkeypatch.setenv("FASTGRPO_BACKEND", "cpp")
    meta = torch.zeros(3, device="meta")
    with pytest.raises(ops.BackendUnavailableError, match="cpp: device meta not supported"):
        ops.grpo_loss(meta, meta, meta, clip_range=0.1)
    monkeypatch.setenv("FASTGRPO_BACKEND", "reference")
    assert ops.explain("grpo_loss", "cpu")[0] == "reference"
    monkeypatch.delenv("FASTGRPO_BACKEND")
    chosen, rejected = ops.explain("grpo_loss", "cpu")
    assert chosen in ("cpp", "reference") and "auto picks Triton for CUDA tensors only" in rejected["triton"]
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.grpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), clip_range=0.1, backend="cuda")


def test_invalid_step_inputs():
    x = torch.zeros(2, 4, 2, 2)
    alphas = torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ops.ddim_logprob(x, x, x, alphas, alphas, eta=0.0)
    with pytest.raises(ValueError, match="alpha_prod_t must have shape"):
        ops.ddim_logprob(x, x, x, alphas[:1], alphas)
    with pytest.raises(ValueError, match="prev_sample has shape"):
        ops.ddim_logprob(x, x, x[:1], alphas, alphas)
    with pytest.raises(ValueError, match="uncond_output has shape"):
        ops.ddim_logprob(x, x, x, alphas, alphas, uncond_output=x[:, :2])
    with pytest.raises(ValueError, match="alpha_prod_t_prev must have shape"):
        ops.ddim_logprob(x, x, x, alphas, alphas[:, None])
    with pytest.raises(ValueError, match="model_output must be"):
        ops.ddim_logprob(alphas, alphas, alphas, alphas, alphas)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        ops.ddim_logprob(x, x, x, alphas, alphas, prediction_type="sample")
    with pytest.raises(ValueError, match="reduction must be one of"):
        ops.ddim_step(x, x, alphas, alphas, x, reduction="max")
    with pytest.raises(ValueError, match="noise has shape"):
        ops.ddim_step(x, x, alphas, alphas, x[:, :1])


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.zeros(2, 4, 2, 2)
    alphas = torch.full((2,), 0.5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailableError, match="triton: CPU tensors need TRITON_INTERPRET=1"):
        ops.ddim_logprob(x, x, x, alphas, alphas, backend="triton")
    monkeypatch.setenv("FASTGRPO_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.ddim_logprob(x, x, x, alphas, alphas)


def test_reference_matches_ops_module_directly():
    """The reference module is importable on its own (the same functions other codebases call)."""
    gen = torch.Generator().manual_seed(8)
    a, b, c = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    alphas = torch.tensor([0.5, 0.6]), torch.tensor([0.55, 0.65])
    assert torch.equal(reference.ddim_logprob(a, b, c, *alphas), ops.ddim_logprob(a, b, c, *alphas))
