"""Recipe levers: which timesteps train (`train.timestep_window`), the asymmetric clip (`train.clip_range_high`)."""

from __future__ import annotations

import pytest
import torch

from fastgrpo.config import ConfigError, load_config
from fastgrpo.grpo import plan_update


def test_timestep_window_draws_steps_from_the_noisy_end_only():
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    plan = plan_update(torch.arange(200), 10, 0.3, gen(), timestep_window=0.5)
    assert plan.steps.shape == (200, 3)
    assert plan.steps.max() < 5                                         # only the first 5 of 10 steps
    assert all(len(set(row)) == 3 for row in plan.steps.tolist())      # 3 distinct steps per sample
    assert set(plan.steps.flatten().tolist()) == set(range(5))          # every eligible step is used
    # window 1 is the old behaviour, bit for bit: every step eligible, the same draw
    full, default = plan_update(torch.arange(50), 10, 0.3, gen(), 1.0), plan_update(torch.arange(50), 10, 0.3, gen())
    assert torch.equal(full.steps, default.steps) and torch.equal(full.order, default.order)
    assert full.steps.max() >= 5
    # the window never holds fewer steps than are trained
    assert plan_update(torch.arange(4), 10, 0.5, gen(), 0.5).steps.max() < 5


def test_timestep_window_is_checked():
    with pytest.raises(ConfigError, match="timestep_window"):
        load_config(None, ["train.timestep_fraction=0.5", "train.timestep_window=0.3"])
    with pytest.raises(ConfigError, match="timestep_window"):
        load_config(None, ["train.timestep_window=1.5"])
    assert load_config(None, ["train.timestep_window=0.5"]).train.timestep_window == 0.5


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
