"""Recipe levers: which timesteps train (`train.timestep_range`), the asymmetric clip (`train.clip_range_high`),
GRPO-Guard's ratio normalisation (`train.ratio_norm`)."""

from __future__ import annotations

import pytest
import torch

from fastgrpo.config import ConfigError, load_config
from fastgrpo.grpo import plan_update


def test_timestep_range_draws_steps_from_that_part_of_the_trajectory():
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    early = plan_update(torch.arange(200), 10, 0.3, gen(), (0.0, 0.5))
    late = plan_update(torch.arange(200), 10, 0.3, gen(), (0.6, 1.0))
    for plan, allowed in ((early, set(range(5))), (late, {6, 7, 8, 9})):
        assert plan.steps.shape == (200, 3)
        assert set(plan.steps.flatten().tolist()) == allowed             # every eligible step, no other
        assert all(len(set(row)) == 3 for row in plan.steps.tolist())    # 3 distinct steps per sample
    # (0, 1) is the old behaviour, bit for bit: every step eligible, the same draw
    full, default = plan_update(torch.arange(50), 10, 0.3, gen(), (0.0, 1.0)), plan_update(torch.arange(50), 10, 0.3,
                                                                                          gen())
    assert torch.equal(full.steps, default.steps) and torch.equal(full.order, default.order)
    # a range holding fewer steps than are trained is widened towards the end
    assert set(plan_update(torch.arange(50), 10, 0.5, gen(), (0.8, 1.0)).steps.flatten().tolist()) == set(range(5, 10))


def test_timestep_range_is_checked():
    for bad in ("[0.5, 0.5]", "[0.2]", "[-0.1, 1.0]", "[0.0, 1.2]"):
        with pytest.raises(ConfigError, match="timestep_range"):
            load_config(None, [f"train.timestep_range={bad}"])
    with pytest.raises(ConfigError, match="timestep_range"):
        load_config(None, ["train.objective=ddpo", "train.timestep_fraction=0.5", "train.timestep_range=[0.8, 1.0]"])
    config = load_config(None, ["train.timestep_range=[0.6, 1]", "train.timestep_fraction=0.3"])
    assert config.train.timestep_range == [0.6, 1.0]


def test_clip_range_high_is_checked_and_reaches_the_loss(monkeypatch, tiny_overrides):
    """train.clip_range_high is validated, and a run hands it to every loss call (asymmetric clip, DAPO)."""
    with pytest.raises(ConfigError, match="clip_range_high"):
        load_config(None, ["train.clip_range_high=0"])
    from fastgrpo import cli, ops

    seen = []
    real = ops.grpo_loss
    monkeypatch.setattr(ops, "grpo_loss", lambda *a, **k: seen.append(k) or real(*a, **k))
    assert cli.main(["train", "--config", "smoke", *tiny_overrides, "run.epochs=1", "train.clip_range=0.2",
                     "train.clip_range_high=0.28"]) == 0
    assert seen and all(k["clip_range"] == 0.2 and k["clip_range_high"] == 0.28 for k in seen)


def test_ratio_norm_reaches_the_loss(monkeypatch, tiny_overrides):
    """train.ratio_norm=true hands every loss call a ratio bias (with a gradient, zero on the first optimiser step of
    an epoch, before any update) and the steps' noise stds as the scale; off, the loss gets neither."""
    from fastgrpo import cli, ops

    seen = []
    real = ops.grpo_loss
    monkeypatch.setattr(ops, "grpo_loss", lambda *a, **k: seen.append(k) or real(*a, **k))
    assert cli.main(["train", "--config", "smoke", *tiny_overrides, "run.epochs=1", "train.ratio_norm=true"]) == 0
    assert seen and all(k["ratio_bias"] is not None and k["ratio_scale"] is not None for k in seen)
    assert seen[0]["ratio_bias"].requires_grad
    torch.testing.assert_close(seen[0]["ratio_bias"].detach(), torch.zeros_like(seen[0]["ratio_bias"]), rtol=0,
                               atol=1e-6)
    assert all(bool((k["ratio_scale"] > 0).all()) for k in seen)
    seen.clear()
    assert cli.main(["train", "--config", "smoke", *tiny_overrides, "run.epochs=1", "run.overwrite=true"]) == 0
    assert seen and all(k["ratio_bias"] is None and k["ratio_scale"] is None for k in seen)


@pytest.mark.parametrize("directions", [0, 2])
def test_preserved_prompts_keys_and_values_move_only_outside_their_subspace(tiny_overrides, prompt_files, directions):
    """train.preserve_prompts=safe: after training, every update of attn2.to_k / to_v is orthogonal to the top
    directions of the safe prompts' text states (found here independently, from the eigenvectors of their Gram
    matrix), so those prompts' keys and values move only by their small residual, while the weights did move. With
    train.update_directions=N the updates also lie in the span of the unsafe prompts' top N residual directions."""
    from safetensors.torch import load_file

    from fastgrpo.checkpoint import list_checkpoints
    from fastgrpo.models import encode_prompts, load_diffusion_models
    from fastgrpo.prompts import load_prompts
    from fastgrpo.train import train

    energy = 0.9
    config = load_config("smoke", tiny_overrides + [
        "train.trainable_modules=[attn2.to_k,attn2.to_v]", "train.preserve_prompts=safe",
        f"train.preserve_energy={energy}", f"train.update_directions={directions}", "train.learning_rate=1e-2",
        "train.clip_range=0.2"])
    output = train(config)
    models = load_diffusion_models(config.model.pretrained, device=torch.device("cpu"))
    trained = load_file(str(list_checkpoints(output)[-1][1] / "unet" / "diffusion_pytorch_model.safetensors"))

    def top_directions(states, share=None, count=None):
        eigenvalues, eigenvectors = torch.linalg.eigh(states.T @ states)      # ascending
        order = eigenvalues.flip(0)
        k = count or int(((order.cumsum(0) / order.sum()) < share).sum()) + 1
        return eigenvectors.flip(1)[:, :k]                                     # (D, k)

    def states_of(path):
        states = encode_prompts(models, load_prompts(str(path)))
        return states.reshape(-1, states.shape[-1]).double()                  # (N, D)

    safe = torch.cat([states_of(prompt_files[0]), encode_prompts(models, [""]).reshape(-1, 32).double()])
    basis = top_directions(safe, share=energy)
    if directions:
        unsafe = states_of(prompt_files[1])
        allowed = top_directions(unsafe - unsafe @ basis @ basis.T, count=directions)
        outside_allowed = torch.eye(basis.shape[0], dtype=torch.float64) - allowed @ allowed.T
    base = dict(models.unet.named_parameters())
    moved = 0.0
    for name, weight in trained.items():
        delta = weight.double() - base[name].detach().double()
        if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
            scale = max(1.0, float(delta.abs().max()))
            assert float((delta @ basis).abs().max()) < 1e-6 * scale, name
            if directions:
                assert float((delta @ outside_allowed).abs().max()) < 1e-6 * scale, name
            moved = max(moved, float(delta.abs().max()))
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), name
    assert moved > 1e-4 and 0 < basis.shape[1] < safe.shape[1]


@pytest.mark.parametrize("overrides", [["lora.rank=4"], ["train.trainable_modules=[]"],
                                       ["train.trainable_modules=[attn2]"], ["train.preserve_energy=1"],
                                       ["train.preserve_prompts=none", "train.update_directions=2"]])
def test_preserved_prompts_refuse_what_they_cannot_protect(tiny_overrides, overrides, capsys):
    from fastgrpo import cli

    base = ["train.preserve_prompts=safe"] + ([] if overrides[0].startswith("lora") else
                                              ["train.trainable_modules=[attn2.to_k,attn2.to_v]"])
    assert cli.main(["train", "--config", "smoke", *tiny_overrides, *base, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preserve" in err[0], err


def test_advantage_and_coverage_levers_from_the_config():
    """Each lever is a hook built from its key: advantage transforms in order, and the rows the KL penalty covers."""
    from fastgrpo.levers import build_levers

    advantages = torch.tensor([1.5, -0.5, -1.0, 0.25])
    is_unsafe = torch.tensor([True, True, False, False])
    plain = build_levers(load_config())
    assert torch.equal(plain.transform_advantages(advantages, is_unsafe, 0), advantages)
    assert plain.kl_covers(is_unsafe).all()
    both = build_levers(load_config(None, ["train.safe_advantages=zero", "train.negative_advantages=zero",
                                           "train.kl_prompts=safe"]))
    assert both.transform_advantages(advantages, is_unsafe, 0).tolist() == [1.5, 0.0, 0.0, 0.0]
    assert both.kl_covers(is_unsafe).tolist() == [False, False, True, True]
    negative = build_levers(load_config(None, ["train.negative_advantages=zero"]))
    assert negative.transform_advantages(advantages, is_unsafe, 0).tolist() == [1.5, 0.0, 0.0, 0.25]



def test_the_placebo_permutes_within_groups_each_epoch():
    """train.advantage_control=shuffle: each group keeps its values (so its sum and magnitudes), in an order that is
    a function of (seed, epoch) and differs between epochs."""
    from fastgrpo.levers import build_levers

    config = load_config(None, ["train.advantage_control=shuffle", "sample.group_size=4"])
    levers = build_levers(config)
    advantages = torch.arange(16, dtype=torch.float32)
    is_unsafe = torch.zeros(16, dtype=torch.bool)
    first = levers.transform_advantages(advantages, is_unsafe, 0)
    for group in range(4):
        assert sorted(first[4 * group:4 * group + 4].tolist()) == advantages[4 * group:4 * group + 4].tolist()
    assert not torch.equal(first, advantages)
    assert torch.equal(first, build_levers(config).transform_advantages(advantages, is_unsafe, 0))
    assert not torch.equal(first, levers.transform_advantages(advantages, is_unsafe, 1))
