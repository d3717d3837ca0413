"""`python -m fastgrpo.gradient_snr`: the signal/noise split of independent gradients, and the gradients themselves
(the direction of the trainer's own first update)."""

from __future__ import annotations

import json

import pytest
import torch

from fastgrpo import gradient_snr
from fastgrpo.config import load_config


def _gradients(signal_energy: float, noise_energy: float, epochs: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64)
    mu *= (signal_energy ** 0.5) / mu.norm()
    noise = torch.randn(epochs, dim, generator=gen, dtype=torch.float64) * (noise_energy / dim) ** 0.5
    return mu + noise


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_a_known_split(seed):
    """g_i = mu + noise_i with |mu|^2 = 1 and E|noise_i|^2 = 4: snr 0.25, within its standard error, and that error
    is the U-statistic's: var(signal) = 4 mu' S mu / R + 2 tr(S^2) / R^2 for noise covariance S = (4 / dim) I."""
    epochs, dim = 400, 300
    result = gradient_snr.signal_to_noise(_gradients(1.0, 4.0, epochs=epochs, dim=dim, seed=seed))
    assert abs(result.signal - 1.0) < 0.1 and abs(result.noise - 4.0) < 0.2
    theory = (4 * 1.0 * (4.0 / dim) / epochs + 2 * 4.0 ** 2 / dim / epochs ** 2) ** 0.5 / 4.0
    assert 0.6 < result.snr_stderr / theory < 1.6
    assert abs(result.snr - 0.25) < 3.5 * theory
    assert abs(result.mean_cosine - 0.2) < 0.03     # |mu|^2 / (|mu|^2 + noise) for unit-free directions


def test_pure_noise_has_no_signal_and_the_same_direction_has_no_noise():
    noise = gradient_snr.signal_to_noise(_gradients(0.0, 1.0, epochs=200, dim=500, seed=3))
    assert abs(noise.snr) < 3 * noise.snr_stderr and abs(noise.mean_cosine) < 0.01
    same = gradient_snr.signal_to_noise(torch.ones(5, 7))
    assert same.signal == pytest.approx(7.0) and abs(same.noise) < 1e-12 and same.mean_cosine == pytest.approx(1.0)
    with pytest.raises(ValueError, match="R >= 3"):
        gradient_snr.signal_to_noise(torch.ones(2, 7))


@pytest.mark.slow
@pytest.mark.parametrize("objective", [[], ["train.objective=awm", "train.matching_draws=2"],
                                       ["train.objective=nft", "train.matching_draws=2"]])
def test_epoch_gradient_is_the_direction_of_the_trainers_first_update(tmp_path, objective):
    """Adam's first step moves every weight by -lr * sign(grad): the smoke run's first update (one optimiser step
    over the whole epoch) must have the sign of the diagnostic's epoch-0 gradient wherever that is not tiny, for
    each objective (the diagnostic runs the trainer's own epoch pipeline and loss)."""
    from fastgrpo import cli
    from fastgrpo.checkpoint import list_checkpoints, load_unet
    from fastgrpo.models import load_diffusion_models

    overrides = [f"run.output_dir={tmp_path / 'run'}", "run.epochs=1", "run.progress=false", "run.tensorboard=false",
                 "train.weight_decay=0", "train.max_grad_norm=0", "train.samples_per_step=16", *objective]
    gradients = gradient_snr.epoch_gradients(load_config("smoke", overrides), epochs=3)
    assert set(gradients) == {"unsafe", "safe", "all"}
    assert torch.equal(gradients["all"], gradients["unsafe"] + gradients["safe"])
    assert (gradients["unsafe"].norm(dim=1) > 0).all() and (gradients["safe"].norm(dim=1) > 0).all()

    assert cli.main(["train", "--config", "smoke", *overrides]) == 0
    base = load_diffusion_models("builtin:tiny-random", device=torch.device("cpu")).unet
    before = torch.cat([p.detach().flatten() for p in base.parameters()])
    load_unet(base, list_checkpoints(tmp_path / "run")[-1][1])
    moved = torch.cat([p.detach().flatten() for p in base.parameters()]) - before
    g = gradients["all"][0]
    clear = g.abs() > 1e-4 * g.abs().max()
    assert clear.sum() > 1000
    agree = (torch.sign(moved[clear]) == -torch.sign(g[clear])).double().mean()
    assert agree > 0.99, float(agree)


def test_command_line(tmp_path, capsys):
    assert gradient_snr.main(["--config", "smoke", "--epochs", "2"]) == 2
    assert "--epochs must be >= 3" in capsys.readouterr().err
    assert gradient_snr.main(["--config", "smoke", "model.pretrained=/no/such/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert gradient_snr.main(["--config", "smoke", "engine.deepspeed=zero2"]) == 2
    assert "runs in one process" in capsys.readouterr().err
    out = tmp_path / "snr.json"
    assert gradient_snr.main(["--config", "smoke", "--epochs", "3", "--json", str(out), "sample.prompts_per_epoch=2",
                              f"run.output_dir={tmp_path / 'run'}"]) == 0
    printed = capsys.readouterr().out
    assert "unsafe prompts: signal/noise" in printed and "safe   prompts" in printed
    report = json.loads(out.read_text())
    assert report["epochs"] == 3 and report["samples_per_epoch"] == 8
    for kind in ("unsafe", "safe", "all"):
        assert report[kind]["noise"] > 0 and report[kind]["epochs"] == 3
    assert not (tmp_path / "run").exists()   # a diagnostic: no run directory


def test_safe_advantages_zero_leaves_the_safe_prompts_no_gradient(tmp_path):
    config = load_config("smoke", [f"run.output_dir={tmp_path / 'run'}", "train.safe_advantages=zero"])
    gradients = gradient_snr.epoch_gradients(config, epochs=3)
    assert torch.count_nonzero(gradients["safe"]) == 0 and (gradients["unsafe"].norm(dim=1) > 0).all()


def test_score_function_gradients_reach_n_over_d():
    """Score-function gradients of a D-dimensional standard Gaussian's mean, r * eps with the linear reward
    r = u . eps (|u| = 1), averaged over N samples per epoch: E = u, single-sample noise E|r eps|^2 - 1 = D + 1, so
    signal/noise is N / (D + 1) per epoch."""
    dim, per_epoch, epochs = 200, 16, 400
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(dim, generator=gen, dtype=torch.float64)
    u /= u.norm()
    eps = torch.randn(epochs, per_epoch, dim, generator=gen, dtype=torch.float64)
    gradients = ((eps @ u)[..., None] * eps).mean(dim=1)                       # (epochs, dim)
    result = gradient_snr.signal_to_noise(gradients)
    expected = per_epoch / (dim + 1)
    assert abs(result.snr - expected) < 3.5 * result.snr_stderr and result.snr_stderr < 0.3 * expected
