"""The advantage-weighted matching loss (`ops.matching_loss`): the reference against a float64 loop written from the
definition, and every fused backend (C++, Triton) against the reference, forward and backward."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import TEST_DEVICE, assert_compiled_gradients_match, assert_same_under_thread_counts
from fastgrpo import ops
from fastgrpo.ops import reference

FUSED = ["cpp", "triton"] if TEST_DEVICE.type == "cpu" else ["triton"]


def loop_loss(cond, target, adv, old, uncond, ref, g, low, high, kl_coef):
    """(loss, surrogates, d loss / d cond, d loss / d uncond) in float64 Python scalars, one row at a time."""
    batch = cond.shape[0]
    loss, surrogates = 0.0, []
    grad_cond = torch.zeros_like(cond, dtype=torch.float64)
    grad_uncond = torch.zeros_like(cond, dtype=torch.float64)
    for i in range(batch):
        c, t = cond[i].double().flatten().tolist(), target[i].double().flatten().tolist()
        u = uncond[i].double().flatten().tolist() if uncond is not None else None
        r = ref[i].double().flatten().tolist() if ref is not None else None
        n = len(c)
        guided = [u[k] + g * (c[k] - u[k]) for k in range(n)] if u is not None else c
        surrogate = -sum((guided[k] - t[k]) ** 2 for k in range(n)) / n
        surrogates.append(surrogate)
        ratio = math.exp(surrogate - old[i]) if old is not None else 1.0
        a = float(adv[i])
        unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - low), 1 + high)
        loss += max(unclipped, clipped) / batch
        d_surrogate = unclipped / batch if unclipped >= clipped else 0.0
        d_guided = [d_surrogate * -2.0 / n * (guided[k] - t[k]) for k in range(n)]
        if r is not None:
            loss += kl_coef * sum((guided[k] - r[k]) ** 2 for k in range(n)) / n / batch
            d_guided = [d_guided[k] + kl_coef / batch * 2.0 / n * (guided[k] - r[k]) for k in range(n)]
        d = torch.tensor(d_guided, dtype=torch.float64).view(cond.shape[1:])
        grad_cond[i] = g * d if u is not None else d
        grad_uncond[i] = (1 - g) * d
    return loss, torch.tensor(surrogates, dtype=torch.float64), grad_cond, grad_uncond


def _inputs(batch, shape, dtype, with_uncond, with_ref, with_old, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    cond = rand(batch, *shape)
    target = cond + 0.5 * rand(batch, *shape)
    # old surrogates near the current ones, so some ratios fall inside the clip interval and some outside
    guided_err = None
    uncond = rand(batch, *shape) if with_uncond else None
    ref = rand(batch, *shape) if with_ref else None
    advantages = rand(batch)
    old = None
    if with_old:
        guided = reference.guided_output(cond.double(), None if uncond is None else uncond.double(), 2.0)
        guided_err = -((guided - target.double()) ** 2).reshape(batch, -1).mean(1)
        old = (guided_err + 0.3 * torch.randn(batch, generator=gen, dtype=torch.float64)).to(device=device,
                                                                                              dtype=dtype)
    return cond, target, advantages, old, uncond, ref


@pytest.mark.parametrize("with_uncond, with_ref, with_old", list(itertools.product((False, True), repeat=3)))
def test_reference_matches_a_float64_loop(with_uncond, with_ref, with_old):
    cond, target, adv, old, uncond, ref = _inputs(6, (3, 5), torch.float64, with_uncond, with_ref, with_old)
    cond.requires_grad_(True)
    if uncond is not None:
        uncond.requires_grad_(True)
    loss, stats, surrogates = reference.matching_loss(cond, target, adv, clip_range=0.1, clip_range_high=0.2,
                                                      old_surrogates=old, uncond_prediction=uncond,
                                                      guidance_scale=2.0, reference_prediction=ref, kl_coef=0.3)
    loss.backward()
    expected, expected_surrogates, grad_cond, grad_uncond = loop_loss(cond.detach(), target, adv, old,
                                                                      None if uncond is None else uncond.detach(),
                                                                      ref, 2.0, 0.1, 0.2, 0.3)
    assert abs(float(loss.detach()) - expected) < 1e-12
    torch.testing.assert_close(surrogates, expected_surrogates, rtol=0, atol=1e-12)
    torch.testing.assert_close(cond.grad, grad_cond, rtol=0, atol=1e-12)
    if uncond is not None:
        torch.testing.assert_close(uncond.grad, grad_uncond, rtol=0, atol=1e-12)
    if with_old:  # the inputs put some ratios outside the clip interval, so the clip's zero gradient is exercised
        assert 0 < float(stats["clipfrac"]) < 1
    assert ("kl" in stats) == with_ref


def test_on_policy_ratio_is_exactly_one_and_the_gradient_is_the_advantage_weighted_denoising_gradient():
    cond, target, adv, _, _, _ = _inputs(4, (2, 3), torch.float64, False, False, False)
    cond.requires_grad_(True)
    loss, stats, surrogates = reference.matching_loss(cond, target, adv, clip_range=1e-3)
    assert float(stats["ratio_min"]) == float(stats["ratio_max"]) == 1.0
    loss.backward()
    # d/d cond of -mean_i(A_i * surrogate_i) = mean_i(A_i * 2 (cond - target) / N)
    expected = adv.view(-1, 1, 1) * 2 * (cond.detach() - target) / 6 / 4
    torch.testing.assert_close(cond.grad, expected, rtol=0, atol=1e-14)


CASES = [(batch, shape, uncond, ref, old) for (batch, shape), uncond, ref, old in itertools.product(
    ((1, (4, 8, 8)), (5, (3, 37, 41)), (130, (2, 3))), (False, True), (False, True), (False, True))]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_backends_match_the_reference(backend, dtype):
    worst = 0.0
    for batch, shape, with_uncond, with_ref, with_old in CASES:
        inputs = _inputs(batch, shape, dtype, with_uncond, with_ref, with_old, device=TEST_DEVICE)
        results = {}
        for name in ("reference", backend):
            cond, target, adv, old, uncond, ref = (None if t is None else t.clone() for t in inputs)
            cond.requires_grad_(True)
            if uncond is not None:
                uncond.requires_grad_(True)
            loss, stats, surrogates = ops.matching_loss(cond, target, adv, clip_range=0.1, clip_range_high=0.2,
                                                        old_surrogates=old, uncond_prediction=uncond,
                                                        guidance_scale=2.0, reference_prediction=ref, kl_coef=0.3,
                                                        backend=name)
            (2.5 * loss).backward()  # an upstream gradient other than 1
            results[name] = (loss.detach(), stats, surrogates, cond.grad, None if uncond is None else uncond.grad)
        expected, got = results["reference"], results[backend]
        assert sorted(expected[1]) == sorted(got[1])
        pairs = [(expected[0], got[0]), (expected[2], got[2]), (expected[3], got[3]),
                 *((expected[1][k], got[1][k]) for k in expected[1])]
        if expected[4] is not None:
            pairs.append((expected[4], got[4]))
        for want, have in pairs:
            scale = max(1.0, float(want.abs().max()))
            worst = max(worst, float((want - have).abs().max()) / scale)
    assert worst < (1e-5 if dtype == torch.float32 else 1e-12), worst


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_gradcheck_in_float64(backend):
    cond, target, adv, old, uncond, ref = _inputs(3, (2, 5), torch.float64, True, True, True, device=TEST_DEVICE)
    cond.requires_grad_(True)
    uncond.requires_grad_(True)

    def loss(c, u):
        return ops.matching_loss(c, target, adv, clip_range=0.1, old_surrogates=old, uncond_prediction=u,
                                 guidance_scale=2.0, reference_prediction=ref, kl_coef=0.3, backend=backend)[0]

    assert torch.autograd.gradcheck(loss, (cond, uncond))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_custom_op_passes_opcheck_and_compiles(backend):
    cond, target, adv, old, uncond, ref = _inputs(3, (2, 4, 4), torch.float32, True, True, True, device=TEST_DEVICE)
    args = (cond.clone().requires_grad_(True), uncond.clone().requires_grad_(True), target, ref, adv, old, 2.0, 0.1,
            0.2, 0.3, backend)
    torch.library.opcheck(ops.matching_loss_op, args)

    def step_loss(c, u):
        return ops.matching_loss(c, target, adv, clip_range=0.1, old_surrogates=old, uncond_prediction=u,
                                 guidance_scale=2.0, reference_prediction=ref, kl_coef=0.3, backend=backend)[0]

    assert_compiled_gradients_match(step_loss, [cond, uncond])


def test_results_do_not_depend_on_the_thread_count():
    cond, target, adv, old, uncond, ref = _inputs(7, (4, 64, 64), torch.float32, True, True, True)

    def run():
        c = cond.clone().requires_grad_(True)
        loss, _, surrogates = ops.matching_loss(c, target, adv, clip_range=0.1, old_surrogates=old,
                                                uncond_prediction=uncond, guidance_scale=2.0,
                                                reference_prediction=ref, kl_coef=0.3, backend="cpp")
        loss.backward()
        return loss.detach(), surrogates, c.grad

    assert_same_under_thread_counts(run)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target=torch.zeros(3, 2, 5)), "target has shape"),
    (dict(advantages=torch.zeros(4)), "advantages must have shape"),
    (dict(old_surrogates=torch.zeros(3, 1)), "old_surrogates must have shape"),
    (dict(clip_range=0.0), "clip_range must be > 0"),
])
def test_bad_inputs_are_one_clear_error(kwargs, message):
    args = dict(prediction=torch.zeros(3, 4, 5), target=torch.zeros(3, 4, 5), advantages=torch.zeros(3),
                clip_range=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ops.matching_loss(**args)
