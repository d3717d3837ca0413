"""The negative-aware fine-tuning loss (`ops.nft_loss`, DiffusionNFT): the reference against a float64 loop written
from DiffusionNFT's clean-latent definition (x0 predictions from a noised latent, per row), the gradient at the
rollout policy against its closed form, and every fused backend (C++, Triton) against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import TEST_DEVICE, assert_compiled_gradients_match, assert_same_under_thread_counts
from fastgrpo import ops
from fastgrpo.ops import reference

FUSED = ["cpp", "triton"] if TEST_DEVICE.type == "cpu" else ["triton"]


def loop_loss(clean, noise, alpha, prediction_type, cond, uncond, old, ref, adv, g, beta, m, kl_coef):
    """The loss in float64, one row at a time, as DiffusionNFT writes it: the noised latent x_t, each prediction's
    clean-latent estimate x0_hat, the adaptive weight mean|x0_hat - x0| (a constant), r from the clipped advantage."""
    batch, total = cond.shape[0], 0.0
    for i in range(batch):
        a = torch.tensor(float(alpha[i]), dtype=torch.float64)
        x0, eps = clean[i].double(), noise[i].double()
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps

        def x0_hat(pred):
            if prediction_type == "epsilon":
                return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
            return a.sqrt() * x_t - (1 - a).sqrt() * pred

        guided = cond[i] if uncond is None else uncond[i] + g * (cond[i] - uncond[i])
        positive = beta * guided + (1 - beta) * old[i]
        negative = (1 + beta) * old[i] - beta * guided
        clipped = min(max(float(adv[i]), -m), m)
        r = min(max(clipped / m / 2 + 0.5, 0.0), 1.0)
        losses = []
        for pred in (positive, negative):
            error = x0_hat(pred) - x0
            weight = max(float(error.detach().abs().mean()), 1e-5)
            losses.append((error**2).mean() / weight)
        total = total + m / beta * (r * losses[0] + (1 - r) * losses[1]) / batch
        if ref is not None:
            total = total + kl_coef * ((guided - ref[i]) ** 2).mean() / batch
    return total


def _inputs(batch, shape, dtype, with_uncond, with_ref, prediction_type="epsilon", seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    clean, noise = rand(batch, *shape), rand(batch, *shape)
    alpha = torch.rand(batch, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    a = alpha.view(-1, *(1,) * len(shape))
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * clean
    old = target + 0.4 * rand(batch, *shape)          # the rollout policy: a fair denoiser
    cond = old + 0.1 * rand(batch, *shape)            # a few steps later
    uncond = rand(batch, *shape) if with_uncond else None
    ref = old + 0.2 * rand(batch, *shape) if with_ref else None
    advantages = 2.0 * rand(batch)
    advantages[0] = 7.0                              # beyond the clip
    tensors = [t if t is None else t.to(device=device, dtype=dtype)
               for t in (cond, uncond, target, old, ref, advantages)]
    scale = reference.x0_scale(alpha, prediction_type).to(device=device, dtype=dtype)
    return (*tensors, scale), (clean, noise, alpha)


@pytest.mark.parametrize("prediction_type", reference.PREDICTION_TYPES)
@pytest.mark.parametrize("with_uncond, with_ref", list(itertools.product((False, True), repeat=2)))
def test_reference_matches_a_float64_loop_in_clean_latent_space(prediction_type, with_uncond, with_ref):
    (cond, uncond, target, old, ref, adv, scale), (clean, noise, alpha) = _inputs(
        5, (3, 4), torch.float64, with_uncond, with_ref, prediction_type)
    inputs = [cond.clone().requires_grad_(True), None if uncond is None else uncond.clone().requires_grad_(True)]
    loss, stats = reference.nft_loss(inputs[0], target, old, adv, scale, beta=0.6, adv_clip_max=2.5,
                                     uncond_prediction=inputs[1], guidance_scale=2.0, reference_prediction=ref,
                                     kl_coef=0.3)
    loss.backward()
    loop = [cond.clone().requires_grad_(True), None if uncond is None else uncond.clone().requires_grad_(True)]
    expected = loop_loss(clean, noise, alpha, prediction_type, loop[0], loop[1], old, ref, adv, 2.0, 0.6, 2.5, 0.3)
    expected.backward()
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-12
    torch.testing.assert_close(inputs[0].grad, loop[0].grad, rtol=0, atol=1e-12)
    if uncond is not None:
        torch.testing.assert_close(inputs[1].grad, loop[1].grad, rtol=0, atol=1e-12)
    guided = cond if uncond is None else uncond + 2.0 * (cond - uncond)
    torch.testing.assert_close(stats["deviation"], ((guided - old) ** 2).mean(), rtol=0, atol=1e-14)
    assert ("kl" in stats) == with_ref


def test_at_the_rollout_policy_the_gradient_is_the_advantage_weighted_denoising_gradient():
    """At pred = old both implicit predictions are old: d loss / d pred = 2 clip(A) c^2 (old - target) / (N B w),
    w = c mean|old - target| (the weight), whatever beta."""
    (_, _, target, old, _, adv, scale), _ = _inputs(4, (2, 3), torch.float64, False, False)
    for beta in (0.3, 1.0):
        pred = old.clone().requires_grad_(True)
        loss, stats = reference.nft_loss(pred, target, old, adv, scale, beta=beta, adv_clip_max=2.5)
        loss.backward()
        assert float(stats["deviation"]) == 0.0
        c = scale.view(-1, 1, 1)
        weight = (c * (old - target)).abs().mean(dim=(1, 2), keepdim=True)
        expected = 2 * adv.clamp(-2.5, 2.5).view(-1, 1, 1) * c**2 * (old - target) / (6 * 4 * weight)
        torch.testing.assert_close(pred.grad, expected, rtol=1e-12, atol=1e-14)


def test_the_optimum_lies_a_bounded_step_from_the_rollout_policy():
    """One row whose error is the same on every element (so each weighted error is |e|): a good sample (r > 1/2)
    settles where the positive prediction meets the target, pred = old - (old - target) / beta; a bad one where the
    negative does, pred = old + (old - target) / beta. Neither moves further than |old - target| / beta."""
    target, old = torch.zeros(1, 8, dtype=torch.float64), torch.ones(1, 8, dtype=torch.float64)
    scale = torch.ones(1, dtype=torch.float64)
    for advantage, beta, settled in ((1.25, 1.0, 0.0), (-2.5, 1.0, 2.0), (-1.25, 0.5, 3.0), (0.5, 0.5, -1.0)):
        pred = old.clone().requires_grad_(True)
        optimiser = torch.optim.SGD([pred], lr=0.01)
        for _ in range(3000):
            optimiser.zero_grad()
            loss, _ = reference.nft_loss(pred, target, old, torch.tensor([advantage], dtype=torch.float64), scale,
                                         beta=beta, adv_clip_max=2.5)
            loss.backward()
            optimiser.step()
        torch.testing.assert_close(pred.detach(), torch.full_like(old, settled), rtol=0, atol=0.02)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_a_row_with_zero_scale_carries_only_the_penalty(backend):
    """train.kl_timestep_range's penalty-only draws have x0_scale 0: their rows add no loss term and no gradient of
    their own, only the penalty's (float64 loop over the other rows, plus the penalty over all)."""
    (cond, uncond, target, old, ref, adv, scale), (clean, noise, alpha) = _inputs(6, (3, 4), torch.float64, True,
                                                                                  True)
    kept = torch.tensor([True, False, True, True, False, True])
    inputs = [cond.clone().requires_grad_(True), uncond.clone().requires_grad_(True)]
    loss, _ = ops.nft_loss(inputs[0], target, old, adv, scale * kept, beta=0.6, adv_clip_max=2.5,
                           uncond_prediction=inputs[1], guidance_scale=2.0, reference_prediction=ref, kl_coef=0.3,
                           backend=backend)
    loss.backward()
    loop = [cond.clone().requires_grad_(True), uncond.clone().requires_grad_(True)]
    terms = loop_loss(clean[kept], noise[kept], alpha[kept], "epsilon", loop[0][kept], loop[1][kept], old[kept],
                      None, adv[kept], 2.0, 0.6, 2.5, 0.0) * int(kept.sum()) / 6
    guided = loop[1] + 2.0 * (loop[0] - loop[1])
    expected = terms + 0.3 * ((guided - ref) ** 2).mean()
    expected.backward()
    assert abs(float(loss.detach()) - float(expected.detach())) < 1e-12
    torch.testing.assert_close(inputs[0].grad, loop[0].grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(inputs[1].grad, loop[1].grad, rtol=0, atol=1e-12)


CASES = [(batch, shape, uncond, ref) for (batch, shape), uncond, ref in itertools.product(
    ((1, (4, 8, 8)), (5, (3, 37, 41)), (130, (2, 3))), (False, True), (False, True))]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_backends_match_the_reference(backend, dtype):
    worst = 0.0
    for batch, shape, with_uncond, with_ref in CASES:
        inputs, _ = _inputs(batch, shape, dtype, with_uncond, with_ref, device=TEST_DEVICE)
        results = {}
        for name in ("reference", backend):
            cond, uncond, target, old, ref, adv, scale = (None if t is None else t.clone() for t in inputs)
            cond.requires_grad_(True)
            if uncond is not None:
                uncond.requires_grad_(True)
            loss, stats = ops.nft_loss(cond, target, old, adv, scale, beta=0.6, adv_clip_max=2.5,
                                       uncond_prediction=uncond, guidance_scale=2.0, reference_prediction=ref,
                                       kl_coef=0.3, backend=name)
            (2.5 * loss).backward()  # an upstream gradient other than 1
            results[name] = (loss.detach(), stats, cond.grad, None if uncond is None else uncond.grad)
        expected, got = results["reference"], results[backend]
        assert sorted(expected[1]) == sorted(got[1])
        pairs = [(expected[0], got[0]), (expected[2], got[2]), *((expected[1][k], got[1][k]) for k in expected[1])]
        if expected[3] is not None:
            pairs.append((expected[3], got[3]))
        for want, have in pairs:
            scale = max(1.0, float(want.abs().max()))
            worst = max(worst, float((want - have).abs().max()) / scale)
    assert worst < (2e-5 if dtype == torch.float32 else 1e-12), worst


@pytest.mark.parametrize("backend", FUSED)
def test_fused_custom_op_passes_opcheck_and_compiles(backend):
    (cond, uncond, target, old, ref, adv, scale), _ = _inputs(3, (2, 4, 4), torch.float32, True, True,
                                                              device=TEST_DEVICE)
    args = (cond.clone().requires_grad_(True), uncond.clone().requires_grad_(True), target, old, ref, adv, scale,
            2.0, 0.6, 2.5, 0.3, backend)
    torch.library.opcheck(ops.nft_loss_op, args)

    def step_loss(c, u):
        return ops.nft_loss(c, target, old, adv, scale, beta=0.6, adv_clip_max=2.5, uncond_prediction=u,
                            guidance_scale=2.0, reference_prediction=ref, kl_coef=0.3, backend=backend)[0]

    assert_compiled_gradients_match(step_loss, [cond, uncond])


def test_results_do_not_depend_on_the_thread_count():
    (cond, uncond, target, old, ref, adv, scale), _ = _inputs(7, (4, 64, 64), torch.float32, True, True)

    def run():
        c = cond.clone().requires_grad_(True)
        loss, _ = ops.nft_loss(c, target, old, adv, scale, beta=0.6, uncond_prediction=uncond, guidance_scale=2.0,
                               reference_prediction=ref, kl_coef=0.3, backend="cpp")
        loss.backward()
        return loss.detach(), c.grad

    assert_same_under_thread_counts(run)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target=torch.zeros(3, 2, 5)), "target has shape"),
    (dict(old_prediction=torch.zeros(3, 4)), "old_prediction has shape"),
    (dict(advantages=torch.zeros(4)), "advantages must have shape"),
    (dict(x0_scale=torch.zeros(3, 1)), "x0_scale must have shape"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(adv_clip_max=-1.0), "adv_clip_max must be > 0"),
])
def test_bad_inputs_are_one_clear_error(kwargs, message):
    args = dict(prediction=torch.zeros(3, 4, 5), target=torch.zeros(3, 4, 5), old_prediction=torch.zeros(3, 4, 5),
                advantages=torch.zeros(3), x0_scale=torch.ones(3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.nft_loss(**args)
