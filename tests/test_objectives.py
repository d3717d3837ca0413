"""train.objective=awm / nft and SDE windows on the tiny random model: the draws, the noised inputs and deterministic
steps against diffusers' own schedulers, the window's effect on the rollout, and end-to-end runs (first ratio exactly 1,
nft's first step at the rollout policy, resume, LoRA, bad values)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from fastgrpo.checkpoint import list_checkpoints
from fastgrpo.config import load_config
from fastgrpo.diffusion import (DDIMSchedule, Guidance, RolloutSettings, SdeWindow, ddim_deterministic_step,
                                sample_trajectories)
from fastgrpo.errors import ConfigError
from fastgrpo.models import encode_prompts, load_diffusion_models
from fastgrpo.objectives.awm import draw_matching, noised_inputs
from fastgrpo.train import train
from test_train_e2e import read_metrics, run_cli, straight_and_resumed, unet_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tiny_pipeline_dir):
    return load_diffusion_models(str(tiny_pipeline_dir), device=CPU)


def test_draws_depend_only_on_the_global_sample_id():
    timesteps = torch.arange(900, -1, -100)
    whole = draw_matching(torch.arange(8), 4, "uniform", timesteps, 1000, (4, 2, 2), seed=3, epoch=1, device=CPU)
    part = draw_matching(torch.tensor([6, 2]), 4, "uniform", timesteps, 1000, (4, 2, 2), seed=3, epoch=1, device=CPU)
    assert torch.equal(part.timesteps, whole.timesteps[[6, 2]]) and torch.equal(part.noise, whole.noise[[6, 2]])
    other_epoch = draw_matching(torch.arange(8), 4, "uniform", timesteps, 1000, (4, 2, 2), seed=3, epoch=2,
                                device=CPU)
    assert not torch.equal(other_epoch.noise, whole.noise)


def test_timestep_distributions():
    timesteps = torch.arange(900, -1, -100)
    ids = torch.arange(400)
    stratified = draw_matching(ids, 4, "stratified", timesteps, 1000, (1,), seed=0, epoch=0, device=CPU).timesteps
    for k in range(4):  # draw k lies in the k-th quarter, and covers it
        assert stratified[:, k].min() >= 250 * k and stratified[:, k].max() < 250 * (k + 1)
        assert stratified[:, k].max() - stratified[:, k].min() > 200
    sampler = draw_matching(ids, 4, "sampler", timesteps, 1000, (1,), seed=0, epoch=0, device=CPU).timesteps
    assert set(sampler.flatten().tolist()) <= set(timesteps.tolist())
    assert all(len(set(row)) == 4 for row in sampler.tolist())  # distinct steps per sample
    uniform = draw_matching(ids, 4, "uniform", timesteps, 1000, (1,), seed=0, epoch=0, device=CPU).timesteps
    assert uniform.min() >= 0 and uniform.max() < 1000 and len(set(uniform.flatten().tolist())) > 500


def test_timestep_range_limits_every_distribution():
    """train.timestep_range [0.6, 0.9] is the noise levels t in [100, 400) of T = 1000 (closed form), and the sampler
    steps 6, 7, 8 of 10 (t = 300, 200, 100); the default range draws exactly what no range draws."""
    timesteps = torch.arange(900, -1, -100)
    ids = torch.arange(400)

    def draw(distribution, draws=3, **range_):
        return draw_matching(ids, draws, distribution, timesteps, 1000, (1,), seed=0, epoch=0, device=CPU,
                             **range_).timesteps

    for distribution in ("uniform", "stratified", "sampler"):
        assert torch.equal(draw(distribution), draw(distribution, timestep_range=(0.0, 1.0)))
    uniform = draw("uniform", timestep_range=(0.6, 0.9))
    assert uniform.min() == 100 and uniform.max() == 399  # 1,200 draws over 300 values reach both ends
    counts = torch.bincount(uniform.flatten() - 100, minlength=300).double()
    assert counts.std() / counts.mean() < 0.7  # Poisson spread around 4 per value: 0.5; half the values empty: 1
    stratified = draw("stratified", timestep_range=(0.6, 0.9))
    for k in range(3):  # draw k lies in the k-th third of [100, 400), and covers it
        assert stratified[:, k].min() >= 100 + 100 * k and stratified[:, k].max() < 200 + 100 * k
        assert stratified[:, k].max() - stratified[:, k].min() > 90
    sampler = draw("sampler", timestep_range=(0.6, 0.9))
    assert all(sorted(row) == [100, 200, 300] for row in sampler.tolist())
    with pytest.raises(ConfigError, match="fewer than train.matching_draws"):
        draw("sampler", draws=4, timestep_range=(0.6, 0.9))
    with pytest.raises(ConfigError, match="holds none"):
        draw("uniform", timestep_range=(0.9999, 1.0))


@pytest.mark.parametrize("objective", ["awm", "nft"])
def test_kl_timestep_range_trains_one_part_and_penalises_the_other(tiny_overrides, tmp_path, objective):
    """train.timestep_range [0.5, 1] with train.kl_timestep_range [0, 0.5]: the draws span every noise level; those
    with t < 500 (closed form) carry the advantage, those with t >= 500 only the penalty, whose reference there is
    the base model's prediction: the loss of a micro-batch of penalty-only draws is kl_coef * mean((guided -
    guided_ref)^2) exactly, computed here from the two UNets, and its gradient that expression's."""
    from fastgrpo.epoch import collect_epoch
    from fastgrpo.train import prepare

    prediction = "guided" if objective == "awm" else "conditional"  # both kinds of prediction, one each
    config = load_config("smoke", tiny_overrides + [
        f"train.objective={objective}", "train.matching_draws=4", "train.kl_coef=0.5", "sample.guidance_scale=3",
        f"train.matching_prediction={prediction}", "train.timestep_range=[0.5,1.0]",
        "train.kl_timestep_range=[0.0,0.5]"])

    def guide(cond, uncond):
        return cond if uncond is None else uncond + 3.0 * (cond - uncond)

    session, _, _ = prepare(config)
    with torch.no_grad():  # move the policy off the base model, so the reference differs from it
        for p in session.unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        samples = collect_epoch(session, 0)
    draws, predictions, reference_for, trained = session.objective.matching_inputs(session, samples)
    assert torch.equal(trained, draws.timesteps < 500)
    assert bool(trained.any()) and bool((~trained).any())
    rows, units = (~trained).nonzero(as_tuple=True)
    cond, uncond, _, _ = predictions(session.unet, rows, units)
    ref_cond, ref_uncond, _, _ = predictions(session.ref_unet, rows, units)
    guided_ref = guide(ref_cond, ref_uncond)
    torch.testing.assert_close(reference_for(rows, units, cond, uncond), guided_ref, rtol=0, atol=0)
    trained_rows, trained_units = trained.nonzero(as_tuple=True)
    own = predictions(session.unet, trained_rows, trained_units)
    torch.testing.assert_close(reference_for(trained_rows, trained_units, own[0], own[1]),
                               guide(own[0], own[1]).detach(), rtol=0, atol=0)

    params = [p for p in session.unet.parameters() if p.requires_grad]
    advantages = samples.rows(samples.advantages * samples.keep)
    loss, _ = session.objective.loss_fn(session, samples, advantages)(rows, units)  # on-policy
    loss_grad = torch.autograd.grad(loss, params)
    cond, uncond, _, _ = predictions(session.unet, rows, units)
    expected = 0.5 * ((guide(cond, uncond) - guided_ref) ** 2).mean()
    expected_grad = torch.autograd.grad(expected, params)
    assert float(expected.detach()) > 0
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=0)
    for got, want in zip(loss_grad, expected_grad):  # float32 sums in another order: relative to the largest entry
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noised_inputs_match_diffusers(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction_type)
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    t = torch.tensor([0, 500, 999])
    noisy, target = noised_inputs(clean, noise, scheduler.alphas_cumprod[t], prediction_type)
    torch.testing.assert_close(noisy, scheduler.add_noise(clean, noise, t))
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, t)
    torch.testing.assert_close(target, expected)


def test_deterministic_step_equals_diffusers_ddim_at_eta_zero(tiny_pipeline_dir):
    scheduler = DDIMScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler")
    schedule = DDIMSchedule.from_scheduler(scheduler, 5, CPU)
    gen = torch.Generator().manual_seed(0)
    for j, t in enumerate(scheduler.timesteps):
        x, cond, uncond = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        got = ddim_deterministic_step(cond, x, schedule.alpha_prod_t[j].expand(2),
                                      schedule.alpha_prod_t_prev[j].expand(2), uncond_output=uncond,
                                      guidance_scale=3.0)
        expected = scheduler.step(uncond + 3.0 * (cond - uncond), t, x, eta=0.0).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_window_positions():
    assert SdeWindow(2, 3).steps(7, 10, 0) == tuple(3 <= s < 5 for s in range(10))
    sliding = SdeWindow(3, 1, "sliding", shift_every=2)
    assert [sliding.first_step(e, 10, 0) for e in (0, 1, 2, 5, 100)] == [1, 1, 2, 3, 7]
    starts = {SdeWindow(3, 0, "random").first_step(e, 10, 0) for e in range(60)}
    assert starts == set(range(8))


def _rollout(models, stochastic, noise_seed=0, eta=1.0):
    embeds = encode_prompts(models, ["a red apple", "a naked person"])
    uncond = encode_prompts(models, [""])
    schedule = DDIMSchedule.from_scheduler(models.scheduler, 4, CPU)
    settings = RolloutSettings(models.latent_shape(None), 2, 4, False, noise_seed)
    return sample_trajectories(models.unet, models.vae, schedule, embeds, uncond, torch.arange(2).repeat_interleave(2),
                               torch.arange(4), Guidance(eta, 5.0, models.prediction_type), settings, epoch=0,
                               stochastic=stochastic)


def test_a_window_makes_the_other_steps_deterministic_and_shares_the_initial_noise(models):
    window = (False, True, True, False)
    base, reseeded = _rollout(models, window, noise_seed=0), _rollout(models, window, noise_seed=1)
    # a group's samples start from one latent; the two groups from different ones
    assert torch.equal(base.latents[0, 0], base.latents[1, 0]) and not torch.equal(base.latents[0, 0],
                                                                                   base.latents[2, 0])
    # outside the window, no log-prob and no noise: the step is a function of x_t alone
    assert torch.equal(base.log_probs[:, [0, 3]], torch.zeros(4, 2))
    assert (base.log_probs[:, 1:3] != 0).all()
    assert not torch.equal(base.latents[0, 2], base.latents[1, 2])  # the window's noise separates the group
    # a different step noise moves only what the window's steps produce
    assert not torch.equal(base.latents[:, 2], reseeded.latents[:, 2])
    deterministic = _rollout(models, None, eta=0.0)
    assert torch.equal(deterministic.log_probs, torch.zeros(4, 4))
    assert not torch.equal(deterministic.latents[0, -1], deterministic.latents[1, -1])  # own initial noise each


def _steps(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("extra", [
    ["train.objective=awm", "train.matching_draws=3"],
    ["train.objective=awm", "train.matching_prediction=guided", "train.matching_timesteps=sampler", "sample.eta=0",
     "train.kl_coef=0.5"],
    ["sample.sde_window_size=2", "sample.sde_window_schedule=random"],
])
def test_first_optimiser_step_is_on_policy_and_training_moves_the_unet(tiny_overrides, tmp_path, extra):
    run = train(load_config("smoke", tiny_overrides + extra + [f"run.output_dir={tmp_path / 'run'}"]))
    steps = _steps(run)
    assert steps[0]["ratio_min"] == steps[0]["ratio_max"] == 1.0  # the rollout policy's own values, exactly
    assert any(s["ratio_min"] != 1.0 or s["ratio_max"] != 1.0 for s in steps[1:])  # later steps are off-policy
    # each optimiser step takes samples_per_step samples x their trained units: 2 samples per micro-batch
    expected_steps = 2 * 8 // 4  # epochs x samples per epoch / samples per step
    assert len(steps) == expected_steps
    before = load_diffusion_models(tiny_overrides[0].split("=", 1)[1], device=CPU).unet.state_dict()
    after = unet_weights(list_checkpoints(run)[-1][1])
    assert any(not torch.equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize("extra", [
    ["train.objective=nft", "train.matching_draws=3"],
    ["train.objective=nft", "train.matching_prediction=guided", "sample.eta=0", "train.kl_coef=0.5",
     "train.nft_beta=0.3"],
])
def test_nft_first_optimiser_step_starts_at_the_rollout_policy_and_training_moves_the_unet(tiny_overrides, tmp_path,
                                                                                          extra):
    run = train(load_config("smoke", tiny_overrides + extra + [f"run.output_dir={tmp_path / 'run'}"]))
    steps = _steps(run)
    assert "ratio_min" not in steps[0]
    assert len(steps) == 2 * 8 // 4  # two epochs of two optimiser steps
    # each epoch's first step starts at the stored old predictions, the policy's own (exactly without CFG; with it
    # the no-grad and the grad passes may pick different attention kernels); its second step has moved away
    first, second = [s["deviation"] for s in steps[0::2]], [s["deviation"] for s in steps[1::2]]
    assert max(first) < 1e-12 and min(second) > 1e3 * max(max(first), 1e-30)
    before = load_diffusion_models(tiny_overrides[0].split("=", 1)[1], device=CPU).unet.state_dict()
    after = unet_weights(list_checkpoints(run)[-1][1])
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_nft_beta_sets_the_first_update_and_not_only_its_presence(tiny_overrides, tmp_path):
    """beta changes the loss's curvature around the rollout policy, not its first gradient (at pred = old both
    implicit predictions are old): the first optimiser step's gradient norm is the same for two betas, the second
    step's differs."""
    runs = [_steps(train(load_config("smoke", tiny_overrides + [
        "train.objective=nft", f"train.nft_beta={beta}", "train.max_grad_norm=0",
        f"run.output_dir={tmp_path / str(beta)}"]))) for beta in (1.0, 0.2)]
    assert runs[0][0]["grad_norm"] == pytest.approx(runs[1][0]["grad_norm"], rel=1e-5)
    assert runs[0][1]["grad_norm"] != pytest.approx(runs[1][1]["grad_norm"], rel=1e-3)


def test_nft_weighting_moves_the_first_update(tiny_overrides, tmp_path):
    """x0 weighs each draw by its clean-latent scale c(t), prediction by 1: the first gradients differ."""
    norms = [_steps(train(load_config("smoke", tiny_overrides + [
        "train.objective=nft", f"train.nft_weighting={weighting}", "train.max_grad_norm=0", "run.epochs=1",
        f"run.output_dir={tmp_path / weighting}"])))[0]["grad_norm"] for weighting in ("x0", "prediction")]
    assert norms[0] != pytest.approx(norms[1], rel=1e-3)


KL_RANGE = ["train.kl_coef=0.1", "train.timestep_range=[0.5,1.0]", "train.kl_timestep_range=[0.0,0.5]"]


@pytest.mark.parametrize("objective, extra", [("awm", []), ("nft", []), ("nft", KL_RANGE)])
def test_matching_objectives_resume_equals_uninterrupted(tiny_overrides, tmp_path, objective, extra):
    common = tiny_overrides + [f"train.objective={objective}", "run.save_every=1", "run.num_sample_images=0",
                               "run.epochs=3", "train.num_inner_epochs=2", *extra]
    straight, resumed = straight_and_resumed(common, tmp_path)
    a, b = unet_weights(list_checkpoints(straight)[-1][1]), unet_weights(list_checkpoints(resumed)[-1][1])
    assert all(torch.equal(a[k], b[k]) for k in a), "resume is not bitwise exact"


@pytest.mark.parametrize("objective, extra", [("awm", []), ("nft", []), ("awm", KL_RANGE[1:])])
def test_matching_objectives_with_lora_train_only_the_adapters(tiny_overrides, tmp_path, objective, extra):
    run = train(load_config("smoke", tiny_overrides + [f"train.objective={objective}", "lora.rank=2",
                                                       "train.kl_coef=0.1", *extra,
                                                       f"run.output_dir={tmp_path / 'lora'}"]))
    steps = _steps(run)
    assert steps[0].get("ratio_min", 1.0) == 1.0 and steps[0].get("deviation", 0.0) == 0.0
    assert all(s["kl"] >= 0 for s in steps)
    assert steps[-1]["kl"] > 0  # the adapters moved the prediction away from the base model's
    assert (list_checkpoints(run)[-1][1] / "lora").is_dir()


@pytest.mark.parametrize("override, message", [
    ("train.matching_draws=0", "train.matching_draws must be >= 1"),
    ("sample.sde_window_size=5", "sample.sde_window_size must be in [0, sample.num_steps=4]"),
    ("sample.sde_window_start=3", "sample.sde_window_start must be in [0, 2]"),
    ("sample.eta=0", "train.objective=ddpo needs eta > 0"),
    ("train.objective=awm train.ratio_norm=true", "apply to ddpo only"),
    ("train.objective=awm train.kl_coef=0.1 train.kl_estimator=sample", "apply to ddpo only"),
    ("train.objective=awm train.matching_timesteps=sampler train.matching_draws=5",
     "must be <= the sampler's steps in train.timestep_range (4 of 4)"),
    ("train.objective=awm train.matching_timesteps=sampler train.matching_draws=2 train.timestep_range=[0.5,0.6]",
     "must be <= the sampler's steps in train.timestep_range (0 of 4)"),
    ("train.objective=awm train.timestep_range=[0.6,0.4]", "train.timestep_range must be [start, end]"),
    ("train.objective=nft train.nft_beta=0", "train.nft_beta must be > 0"),
    ("train.objective=nft train.ratio_norm=true", "apply to ddpo only"),
    ("train.lr_schedule=cosine train.lr_min_ratio=1.5", "train.lr_min_ratio must be in [0, 1]"),
    ("train.lr_schedule=exponential", "train.lr_schedule"),
    ("train.objective=nft train.kl_timestep_range=[0.0,0.5]", "train.kl_timestep_range needs train.kl_coef > 0"),
    ("train.kl_coef=0.1 train.kl_timestep_range=[0.0,0.5]", "applies to awm and nft"),
    ("train.objective=awm train.kl_coef=0.1 train.kl_timestep_range=[0.5,0.5]",
     "train.kl_timestep_range must be null or [start, end]"),
    ("train.objective=nft train.timestep_range=[0.9999,1.0]", "holds none of the 1000 training timesteps"),
])
def test_bad_values_are_one_line_and_exit_2(tiny_overrides, tmp_path, override, message):
    extra = override.split() + (["sample.sde_window_size=2"] if "window_start" in override else [])
    if "holds none" not in message:  # known from the config alone; the number of noise levels is the scheduler's
        with pytest.raises(ConfigError):
            load_config("smoke", tiny_overrides + extra)
    result = run_cli(tiny_overrides + extra, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
