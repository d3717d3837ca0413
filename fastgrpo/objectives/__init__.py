"""Training objectives: what a rollout must keep, how a micro-batch's loss is computed, and what it trains.

An objective has a `name`, `plan(samples, gen, window)` -> UpdatePlan (each sample's trained *units*: sampler steps
for ddpo, (timestep, noise) draws for awm and nft), `units_per_sample` and `loss_fn(session, samples, advantages, plan)` ->
a `grpo.LossFn` over (trajectory rows, units). `plan=None` asks for the on-policy loss (ratio 1, no stored old
values), whose gradient is the policy gradient that `gradient_snr` measures.
"""

from __future__ import annotations

from fastgrpo.objectives.awm import AdvantageWeightedMatching
from fastgrpo.objectives.ddpo import DDPO
from fastgrpo.objectives.nft import NegativeAwareFineTuning

OBJECTIVES = {"ddpo": DDPO, "awm": AdvantageWeightedMatching, "nft": NegativeAwareFineTuning}


def build_objective(config):
    """The configured objective (config: the run's Config)."""
    return OBJECTIVES[config.train.objective](config)
