"""The flow-matching SDE step op (flow_grpo's `sde_step_with_logprob`), the step tables every backend shares, and the
drop-in examples in docs/examples.

Independent references: the SDE written as drift and diffusion (score form) with torch.distributions.Normal in
float64; diffusers' FlowMatchEulerDiscreteScheduler and DDIMScheduler; closed-form coefficients of one step."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from fastgrpo import ops
from fastgrpo.ops import reference

from conftest import REPO, assert_compiled_gradients_match
from conftest import TEST_DEVICE as DEVICE

FUSED = ["cpp", "triton"] if DEVICE.type == "cpu" else ["triton"]
BACKENDS = ["reference", *FUSED]
SIGMA_MAX = 0.96


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("FASTGRPO_BACKEND", raising=False)


def flow_inputs(batch=4, shape=(3, 5, 6), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    cond, uncond, sample, noise = (torch.randn(batch, *shape, generator=gen, dtype=torch.float64) for _ in range(4))
    sigma = torch.tensor([1.0, 0.8, 0.45, 0.1], dtype=torch.float64)[:batch]  # sigma == 1 takes sigma_max
    sigma_prev = sigma - torch.tensor([0.04, 0.15, 0.2, 0.1], dtype=torch.float64)[:batch]  # the last step ends at 0
    return [t.to(DEVICE, dtype) for t in (cond, uncond, sample, noise, sigma, sigma_prev)]


def independent_flow(velocity, sample, prev, sigma, sigma_prev, noise_level, sde_type, sigma_max=SIGMA_MAX):
    """float64 (mean, noise std, log-prob) from the SDE's definition, not from the step table.

    "sde": x_{t+dt} = x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] dt + std_t sqrt(-dt) z (the score of the
    flow path is -(x + (1 - sigma) v) / sigma); log-prob of torch's Normal, mean over elements.
    "cps": mean = x0_hat (1 - sigma_prev) + x1_hat sqrt(sigma_prev^2 - std_t^2), x0_hat = x - sigma v,
    x1_hat = x + (1 - sigma) v, std_t = sigma_prev sin(noise_level pi / 2); log p = -mean((prev - mean)^2).
    """
    shape = (-1,) + (1,) * (sample.dim() - 1)
    s, sp = sigma.view(shape), sigma_prev.view(shape)
    dt = sp - s
    if sde_type == "sde":
        std_t = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, torch.full_like(s, sigma_max), s)))
        drift = velocity + std_t**2 / (2 * s) * (sample + (1 - s) * velocity)
        mean, std = sample + drift * dt, std_t * torch.sqrt(-dt)
        log_prob = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(prev)
    else:
        std = sp * math.sin(noise_level * math.pi / 2)
        x0, x1 = sample - s * velocity, sample + (1 - s) * velocity
        mean = x0 * (1 - sp) + x1 * torch.sqrt(sp**2 - std**2)
        log_prob = -((prev - mean) ** 2)
    return mean, std, log_prob.flatten(1).mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("with_uncond", [True, False])
def test_flow_step_and_logprob_match_the_sde_definition_fp64(backend, sde_type, with_uncond):
    cond, uncond, sample, noise, sigma, sigma_prev = flow_inputs()
    uncond = uncond if with_uncond else None
    settings = dict(noise_level=0.7, sde_type=sde_type, sigma_max=SIGMA_MAX, uncond_output=uncond,
                    guidance_scale=4.5, backend=backend)
    prev, log_prob = ops.flow_sde_step(cond, sample, sigma, sigma_prev, noise, **settings)
    guided = cond if uncond is None else uncond + 4.5 * (cond - uncond)
    mean, std, expected = independent_flow(guided, sample, prev, sigma, sigma_prev, 0.7, sde_type)
    torch.testing.assert_close(prev, mean + std * noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_prob, expected, rtol=1e-11, atol=1e-11)
    again = ops.flow_sde_logprob(cond, sample, prev, sigma, sigma_prev, **settings)
    torch.testing.assert_close(again, expected, rtol=1e-11, atol=1e-11)
    assert prev.dtype == log_prob.dtype == torch.float64


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flow_gradients_match_the_reference(backend, sde_type, reduction):
    cond, uncond, sample, prev, sigma, sigma_prev = flow_inputs(seed=3)
    grads = {}
    for name in ("reference", backend):
        leaves = [t.clone().requires_grad_(True) for t in (cond, uncond, sample, prev)]
        log_prob = ops.flow_sde_logprob(leaves[0], leaves[2], leaves[3], sigma, sigma_prev, noise_level=0.9,
                                        sde_type=sde_type, sigma_max=SIGMA_MAX, uncond_output=leaves[1],
                                        guidance_scale=3.0, reduction=reduction, backend=name)
        weights = torch.linspace(-1.0, 2.0, log_prob.shape[0], dtype=log_prob.dtype, device=DEVICE)
        grads[name] = torch.autograd.grad((weights * log_prob).sum(), leaves)
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_low_precision_inputs_agree_with_fp64(backend, dtype):
    cond, uncond, sample, noise, sigma, sigma_prev = flow_inputs(batch=4, shape=(4, 16, 16), seed=5, dtype=dtype)
    settings = dict(noise_level=0.7, sde_type="sde", sigma_max=SIGMA_MAX, uncond_output=uncond, guidance_scale=4.5)
    prev, log_prob = ops.flow_sde_step(cond, sample, sigma, sigma_prev, noise, backend=backend, **settings)
    assert prev.dtype == log_prob.dtype == torch.float32  # math in fp32, as flow_grpo upcasts
    double = [t.double() for t in (cond, uncond, sample, noise, sigma, sigma_prev)]
    exact_prev, exact = reference.flow_sde_step(*double[:1], double[2], *double[4:], double[3],
                                                **{**settings, "uncond_output": double[1]})
    torch.testing.assert_close(prev.double(), exact_prev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_prob.double(), exact, rtol=1e-4, atol=1e-4)


def test_flow_sde_tends_to_diffusers_euler_step_as_noise_vanishes():
    """With noise_level -> 0 both SDE types reduce to the deterministic flow-matching Euler step that diffusers'
    FlowMatchEulerDiscreteScheduler takes, between the sigmas the scheduler holds (SD3's shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    gen = torch.Generator().manual_seed(0)
    for index in (0, 3, 7):
        t = scheduler.timesteps[index]
        sample, velocity = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
        scheduler._step_index = None
        expected = scheduler.step(velocity, t, sample).prev_sample
        sigma = scheduler.sigmas[index].expand(2)
        sigma_prev = scheduler.sigmas[index + 1].expand(2)
        for sde_type in ("sde", "cps"):
            table = reference.flow_sde_coefficients(sigma.double(), sigma_prev.double(), noise_level=1e-9,
                                                    sde_type=sde_type, sigma_max=scheduler.sigmas[1].item())
            mean, _ = reference.step_moments(velocity.double(), sample.double(), table)
            torch.testing.assert_close(mean.float(), expected, rtol=1e-5, atol=1e-5)


def probe_table(backend, step, logprob, batch, device):
    """Recover each sample's (coef_x, coef_e, noise_std, precision, log_norm) from a backend's outputs alone:
    prev = coef_x x + coef_e e + noise_std z, so unit inputs read off each coefficient; log p at prev = mean is
    log_norm, and one unit away it is log_norm - precision (mean over one element)."""
    shape = (batch, 1)
    ones, zeros = torch.ones(shape, dtype=torch.float64, device=device), torch.zeros(shape, dtype=torch.float64,
                                                                                       device=device)
    coef_x = step(zeros, ones, zeros, backend)[0]
    coef_e = step(ones, zeros, zeros, backend)[0]
    noise_std = step(zeros, zeros, ones, backend)[0]
    log_norm = logprob(zeros, zeros, zeros, backend)
    precision = log_norm - logprob(zeros, zeros, ones, backend)
    return torch.stack([coef_x[:, 0], coef_e[:, 0], noise_std[:, 0], precision, log_norm], dim=1)


def test_every_backend_applies_the_same_step_table():
    """One source for the step coefficients: each backend's step, probed from outside, is the reference's table, and
    the table equals hand-computed values of one DDIM step and one flow step of each kind."""
    alpha_t = torch.tensor([0.5, 0.3], dtype=torch.float64, device=DEVICE)
    alpha_prev = torch.tensor([0.8, 0.9], dtype=torch.float64, device=DEVICE)
    sigma = torch.tensor([0.8, 0.5], dtype=torch.float64, device=DEVICE)
    sigma_prev = torch.tensor([0.6, 0.0], dtype=torch.float64, device=DEVICE)
    samplers = {
        "ddim": (lambda e, x, z, b: ops.ddim_step(e, x, alpha_t, alpha_prev, z, eta=1.0, backend=b),
                 lambda e, x, p, b: ops.ddim_logprob(e, x, p, alpha_t, alpha_prev, eta=1.0, backend=b),
                 reference.ddim_coefficients(alpha_t, alpha_prev, eta=1.0, prediction_type="epsilon")),
        "sde": (lambda e, x, z, b: ops.flow_sde_step(e, x, sigma, sigma_prev, z, sigma_max=0.9, backend=b),
                lambda e, x, p, b: ops.flow_sde_logprob(e, x, p, sigma, sigma_prev, sigma_max=0.9, backend=b),
                reference.flow_sde_coefficients(sigma, sigma_prev, noise_level=0.7, sigma_max=0.9)),
        "cps": (lambda e, x, z, b: ops.flow_sde_step(e, x, sigma, sigma_prev, z, sde_type="cps", backend=b),
                lambda e, x, p, b: ops.flow_sde_logprob(e, x, p, sigma, sigma_prev, sde_type="cps", backend=b),
                reference.flow_sde_coefficients(sigma, sigma_prev, noise_level=0.7, sde_type="cps")),
    }
    # first sample of each, by hand: DDIM a_t 0.5 -> a_prev 0.8 (eta 1); SDE sigma 0.8 -> 0.6; CPS 0.8 -> 0.6
    ddim_std = math.sqrt(0.2 / 0.5 * (1 - 0.5 / 0.8))
    ddim_dir = math.sqrt(1 - 0.8 - ddim_std**2)
    sde_std_t = 0.7 * math.sqrt(0.8 / 0.2)
    sde_std = sde_std_t * math.sqrt(0.2)
    cps_std = 0.6 * math.sin(0.35 * math.pi)
    cps_keep = math.sqrt(0.36 - cps_std**2)
    by_hand = {
        "ddim": [math.sqrt(0.8 / 0.5), ddim_dir - math.sqrt(0.8) * math.sqrt(0.5) / math.sqrt(0.5), ddim_std,
                 0.5 / ddim_std**2, -math.log(ddim_std) - 0.5 * math.log(2 * math.pi)],
        "sde": [1 - sde_std_t**2 / 1.6 * 0.2, -(1 + sde_std_t**2 * 0.2 / 1.6) * 0.2, sde_std, 0.5 / sde_std**2,
                -math.log(sde_std) - 0.5 * math.log(2 * math.pi)],
        "cps": [0.4 + cps_keep, -0.8 * 0.4 + 0.2 * cps_keep, cps_std, 1.0, 0.0],
    }
    for name, (step, logprob, table) in samplers.items():
        torch.testing.assert_close(table[0].cpu(), torch.tensor(by_hand[name], dtype=torch.float64), rtol=1e-12,
                                   atol=1e-12)
        for backend in BACKENDS:
            torch.testing.assert_close(probe_table(backend, step, logprob, 2, DEVICE), table, rtol=1e-10,
                                       atol=1e-10, msg=lambda m: f"{name} on {backend}: {m}")


@pytest.mark.parametrize("call,match", [
    (dict(sde_type="sde", sigma_max=None), "needs sigma_max"),
    (dict(sde_type="ode"), "sde_type must be one of"),
    (dict(noise_level=0.0), "noise_level must be > 0"),
    (dict(sigma=torch.ones(3)), r"sigma must have shape \(4,\)"),
])
def test_flow_bad_arguments_say_what_is_wrong(call, match):
    cond, _, sample, noise, sigma, sigma_prev = flow_inputs()
    kwargs = dict(noise_level=0.7, sde_type="sde", sigma_max=SIGMA_MAX)
    kwargs.update({k: v for k, v in call.items() if k != "sigma"})
    sigma = call.get("sigma", sigma).to(DEVICE)
    with pytest.raises(ValueError, match=match):
        ops.flow_sde_step(cond, sample, sigma, sigma_prev, noise, **kwargs)


def test_flow_ops_import_with_torch_alone():
    """`from fastgrpo.ops import flow_sde_logprob` needs torch only: no diffusers, transformers, open_clip, numpy
    users or deepspeed get imported."""
    import subprocess

    code = ("import sys; from fastgrpo.ops import flow_sde_logprob, flow_sde_step; "
            "heavy = [m for m in ('diffusers', 'transformers', 'open_clip', 'deepspeed') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ drop-in examples


def _example(name, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "docs" / "examples"))  # as when the script runs: its folder on the path
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddpo_dropin_equals_diffusers_ddim_step_and_runs(monkeypatch):
    """The ddpo-pytorch drop-in samples exactly diffusers' DDIMScheduler.step with the same variance noise, its
    log-prob is the Gaussian's (float64 closed form), and the example's rollout + training recompute runs."""
    from diffusers import DDIMScheduler

    example = _example("ddpo_dropin", monkeypatch)
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type=prediction_type)
        scheduler.set_timesteps(10)
        gen = torch.Generator().manual_seed(1)
        for t in scheduler.timesteps[[0, 4, 9]]:
            sample, output = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
            noise_gen = torch.Generator().manual_seed(int(t))
            prev, log_prob = example.ddim_step_with_logprob(scheduler, output, t, sample, eta=1.0,
                                                            generator=noise_gen)
            noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(int(t)))
            expected = scheduler.step(output, t, sample, eta=1.0, variance_noise=noise).prev_sample
            torch.testing.assert_close(prev, expected, rtol=1e-5, atol=1e-5)
            # the density at that sample against the closed form: prev - mean = sigma_t * noise
            alpha_t = scheduler.alphas_cumprod[t].double()
            prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            alpha_prev = scheduler.alphas_cumprod[max(int(prev_t), 0)].double()
            sigma = math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
            exact = -(noise.double() ** 2).flatten(1).mean(1) / 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
            torch.testing.assert_close(log_prob.double(), exact, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="clip_sample"):
        example.ddim_step_with_logprob(DDIMScheduler(clip_sample=True), torch.zeros(1, 4, 2, 2), torch.tensor(999),
                                       torch.zeros(1, 4, 2, 2), eta=1.0)
    assert example.main() == 0


def test_flow_grpo_dropin_matches_the_sde_definition_and_runs(monkeypatch):
    """The flow_grpo drop-in returns flow_grpo's four values: the sample and log-prob against the SDE's definition
    (float64), its mean, and std_t; and the example's rollout + training recompute runs for both SDE types."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    example = _example("flow_grpo_dropin", monkeypatch)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(2)
    index = torch.tensor([0, 3, 9])
    t = scheduler.timesteps[index]
    sample, velocity = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    sigma, sigma_prev = scheduler.sigmas[index].double(), scheduler.sigmas[index + 1].double()
    for sde_type in ("sde", "cps"):
        prev, log_prob, mean, std_t = example.sde_step_with_logprob(
            scheduler, velocity, t, sample, noise_level=0.7, generator=torch.Generator().manual_seed(5),
            sde_type=sde_type)
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))
        exact_mean, exact_std, exact = independent_flow(velocity.double(), sample.double(), prev.double(), sigma,
                                                        sigma_prev, 0.7, sde_type, scheduler.sigmas[1].item())
        torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prev.double(), exact_mean + exact_std * noise.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(log_prob.double(), exact, rtol=1e-4, atol=1e-4)
        dt = (sigma_prev - sigma).view(-1, 1, 1, 1)
        expected_std_t = exact_std / (-dt).sqrt() if sde_type == "sde" else exact_std
        torch.testing.assert_close(std_t.double().flatten(), expected_std_t.flatten().expand(3), rtol=1e-5,
                                   atol=1e-6)
    assert example.main() == 0


@pytest.mark.parametrize("backend", FUSED)
def test_cached_step_tables_follow_in_place_changes_and_views(backend):
    """The fused ops cache step tables by the schedule tensors' memory: an in-place change of the schedule, views at
    other offsets and other settings must each give the reference's answer, never a stale table."""
    cond, _, sample, prev, _, _ = flow_inputs(batch=3, shape=(2, 4, 4), seed=9)
    schedule = torch.linspace(0.2, 0.9, 6, dtype=torch.float64, device=DEVICE)

    def check(alpha_t, alpha_prev, eta=1.0):
        got = ops.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, eta=eta, backend=backend)
        want = reference.ddim_logprob(cond, sample, prev, alpha_t, alpha_prev, eta=eta)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        return got

    first = check(schedule[1].expand(3), schedule[2].expand(3))
    assert not torch.equal(first, check(schedule[2].expand(3), schedule[3].expand(3)))  # another view
    assert not torch.equal(first, check(schedule[1].expand(3), schedule[2].expand(3), eta=0.5))  # another eta
    schedule.mul_(0.9)  # in place: the same memory now holds other values
    assert not torch.equal(first, check(schedule[1].expand(3), schedule[2].expand(3)))
    flow = dict(noise_level=0.7, sigma_max=0.95, backend=backend)
    sigma = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64, device=DEVICE)
    sigma_prev = sigma - 0.1
    before = ops.flow_sde_logprob(cond, sample, prev, sigma, sigma_prev, **flow)
    sigma_prev[1] = 0.2  # one entry changed in place
    after = ops.flow_sde_logprob(cond, sample, prev, sigma, sigma_prev, **flow)
    torch.testing.assert_close(after, reference.flow_sde_logprob(cond, sample, prev, sigma, sigma_prev,
                                                                 noise_level=0.7, sigma_max=0.95))
    assert after[1] != before[1] and after[0] == before[0]


@pytest.mark.parametrize("backend", FUSED)
def test_flow_step_and_normalised_loss_compile_fullgraph(backend):
    """The flow log-prob and the loss with ratio normalisation and weights trace into one graph (custom ops with
    fake kernels, the step table built inside the graph) and give eager's gradients."""
    cond, uncond, sample, prev, sigma, sigma_prev = flow_inputs(batch=2, shape=(4, 6, 6), seed=13, dtype=torch.float32)
    scale = torch.tensor([0.5, 0.2], device=DEVICE)
    weights = torch.tensor([1.0, 3.0], device=DEVICE)

    def step_loss(c, u):
        lp = ops.flow_sde_logprob(c, sample, prev, sigma, sigma_prev, sigma_max=SIGMA_MAX, uncond_output=u,
                                  guidance_scale=4.0, backend=backend)
        bias = 0.1 * (lp - lp.detach()) + 0.01  # differentiable, as the trainer's drift term is
        loss, _ = ops.grpo_loss(lp, lp.detach() - 0.01, torch.tensor([1.0, -1.0], device=DEVICE), clip_range=0.1,
                                ratio_bias=bias, ratio_scale=scale, weights=weights, backend=backend)
        return loss

    assert_compiled_gradients_match(step_loss, (cond, uncond))
