"""GRPO pieces over tensors: epoch advantages, the random timestep/minibatch plan, and the clipped-ratio update.

Nothing here knows about files, logging or the distributed backend: the update talks to an engine (`backward`,
`step`) and to callables that return log-probs for (sample, step) pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fastgrpo import ops
from fastgrpo.errors import NonFiniteError

# (samples (B,), steps (B,)) -> log-probs (B,)
LogProbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (samples (B,), steps (B,)) -> (log-probs (B,), closed-form KL to the reference (B,) or None), followed by
# (ratio bias (B,), ratio scale (B,)) when the update normalises the ratio (GRPO-Guard)
PolicyFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def epoch_advantages(rewards: torch.Tensor, group_size: int, *, std: str, clip: float, drop_zero_std: bool,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), keep (N,) bool) for rewards (N,) in consecutive groups; keep drops zero-spread groups."""
    advantages = ops.group_advantages(rewards, group_size, std=std, clip=clip, backend=backend)
    keep = torch.ones_like(rewards, dtype=torch.bool)
    if drop_zero_std:
        grouped = rewards.view(-1, group_size)
        spread = grouped.amax(dim=1) > grouped.amin(dim=1)                # (N / G,)
        keep = spread.repeat_interleave(group_size)
    return advantages, keep


def group_kind_stats(rewards: torch.Tensor, advantages: torch.Tensor, is_unsafe: torch.Tensor,
                     group_size: int) -> dict[str, float | None]:
    """Per kind of group (safe / unsafe prompts): the mean within-group reward std and the mean |advantage|, which
    show whether group normalisation blows tiny reward differences up into unit-size updates. rewards, advantages,
    is_unsafe: (N,) in consecutive groups."""
    group_std = rewards.view(-1, group_size).std(dim=1)                                  # (N / G,)
    group_unsafe = is_unsafe.view(-1, group_size)[:, 0]
    stats = {}
    for kind, groups in (("safe", ~group_unsafe), ("unsafe", group_unsafe)):
        present = bool(groups.any())
        samples = groups.repeat_interleave(group_size)
        stats[f"reward_group_std_{kind}"] = float(group_std[groups].mean()) if present else None
        stats[f"advantage_abs_{kind}"] = float(advantages[samples].abs().mean()) if present else None
    return stats


@dataclass
class UpdatePlan:
    order: torch.Tensor  # (M,) sample indices in training order
    steps: torch.Tensor  # (M, K) the K trained step indices of each sample


def plan_update(samples: torch.Tensor, num_steps: int, timestep_fraction: float, gen: torch.Generator,
                timestep_range: tuple[float, float] = (0.0, 1.0),
                step_window: tuple[int, int] | None = None) -> UpdatePlan:
    """Shuffle the samples and give each its own random subset of round(S * fraction) steps, drawn from steps
    [round(S * start), round(S * end)) of the trajectory ((0, 1): every step eligible), widened at the end if that
    holds fewer steps than are trained. step_window (first, size): the steps [first, first + size) instead, of which
    round(size * fraction) are trained (an SDE window)."""
    if step_window is not None:
        first, size = step_window
        num_trained = max(1, round(size * timestep_fraction))
        last = first + size
    else:
        num_trained = max(1, round(num_steps * timestep_fraction))
        first = min(round(num_steps * timestep_range[0]), num_steps - num_trained)
        last = max(round(num_steps * timestep_range[1]), first + num_trained)
    order = samples[torch.randperm(samples.shape[0], generator=gen)]
    steps = first + torch.rand(samples.shape[0], last - first, generator=gen).argsort(dim=1)[:, :num_trained]
    return UpdatePlan(order, steps)


def shard_plan(plan: UpdatePlan, rank: int, world_size: int, samples_per_step: int) -> UpdatePlan:
    """This rank's share of a global plan: the rank-th of world_size equal slices of every optimiser step's chunk.

    A rank rolls out and trains exactly these samples, so each optimiser step covers the same samples and timesteps
    whatever the world size (samples_per_step must be a multiple of world_size).
    """
    positions = torch.arange(plan.order.shape[0])
    mine = (positions % samples_per_step) // (samples_per_step // world_size) == rank
    return UpdatePlan(plan.order[mine], plan.steps[mine])


@dataclass(frozen=True)
class LossSettings:
    clip_range: float
    kl_coef: float = 0.0
    backend: str = "auto"
    skip_nonfinite: bool = False  # skip an optimiser step whose loss or gradient norm is not finite (else raise)
    clip_range_high: float | None = None  # upper clip range (None: clip_range)


class StepStats:
    """Running statistics over the micro-batches of one optimiser step (device tensors; no host syncs)."""

    def __init__(self):
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.ratio_min = self.ratio_max = None

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        self.count += 1
        for name, value in (("loss", loss.detach()), *stats.items()):
            if name not in ("ratio_min", "ratio_max"):
                self.sums[name] = self.sums.get(name, 0.0) + value
        if "ratio_min" in stats:  # objectives without a ratio (nft) report none
            self.ratio_min = stats["ratio_min"] if self.ratio_min is None else torch.minimum(self.ratio_min,
                                                                                            stats["ratio_min"])
            self.ratio_max = stats["ratio_max"] if self.ratio_max is None else torch.maximum(self.ratio_max,
                                                                                            stats["ratio_max"])

    def result(self) -> dict[str, float]:
        values = {name: float(total / self.count) for name, total in self.sums.items()}
        if self.ratio_min is not None:
            values.update(ratio_min=float(self.ratio_min), ratio_max=float(self.ratio_max))
        return values


# (samples (B,), units (B,)) -> (loss, stats): one micro-batch's loss on these rows of the epoch (a unit is a trained
# sampler step for ddpo, a (timestep, noise) draw for awm and nft); stats hold detached 0-dim tensors (with a
# ratio: ratio_min/max)
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def ddpo_loss_fn(policy_fn: PolicyFn, ref_log_prob_fn: LogProbFn | None, old_log_probs: torch.Tensor,
                 advantages: torch.Tensor, loss: LossSettings) -> LossFn:
    """DDPO's clipped per-step log-prob ratio. The KL penalty (loss.kl_coef) uses the closed-form KL that policy_fn
    returns when it returns one, else the k3 estimate from ref_log_prob_fn's log-probs of the stored samples.
    old_log_probs (M, S), advantages (M,)."""

    def loss_fn(samples, steps):
        log_probs, kl, *norm = policy_fn(samples, steps)
        ref_log_probs = None
        if kl is None and ref_log_prob_fn is not None and loss.kl_coef > 0:
            with torch.no_grad():
                ref_log_probs = ref_log_prob_fn(samples, steps)
        value, loss_stats = ops.grpo_loss(
            log_probs, old_log_probs[samples, steps].to(log_probs.device), advantages[samples].to(log_probs.device),
            clip_range=loss.clip_range, ref_log_probs=ref_log_probs, kl_coef=loss.kl_coef, backend=loss.backend,
            clip_range_high=loss.clip_range_high, ratio_bias=norm[0] if norm else None,
            ratio_scale=norm[1] if norm else None)
        if kl is not None:
            value = value + loss.kl_coef * kl.mean()
            loss_stats = {**loss_stats, "kl": kl.detach().mean()}
        return value, loss_stats

    return loss_fn


def micro_batches(plan: UpdatePlan, *, batch_size: int, samples_per_step: int):
    """Per optimiser step, its micro-batches [(rows of the plan, unit column k)]: `samples_per_step` samples x K
    units, `batch_size` samples at one unit each."""
    num_samples, num_units = plan.steps.shape
    for step_start in range(0, num_samples, samples_per_step):
        step_end = min(num_samples, step_start + samples_per_step)
        yield [(slice(b, min(b + batch_size, step_end)), k)
               for b in range(step_start, step_end, batch_size) for k in range(num_units)]


def policy_update(engine, loss_fn: LossFn, plan: UpdatePlan, *, batch_size: int, samples_per_step: int,
                  skip_nonfinite: bool = False) -> Iterator[dict[str, float]]:
    """Clipped-ratio updates over the plan; yields each optimiser step's statistics (with `grad_norm` and
    the `lr` the step used).

    One optimiser step covers `samples_per_step` samples x K units (see `micro_batches`), their losses averaged by
    gradient accumulation.
    """
    for batches in micro_batches(plan, batch_size=batch_size, samples_per_step=samples_per_step):
        stats = StepStats()
        for rows, k in batches:
            value, loss_stats = loss_fn(plan.order[rows], plan.steps[rows, k])
            engine.backward(value / len(batches), is_last=(rows, k) == batches[-1])
            stats.add(value, loss_stats)
        reduced, learning_rate = engine.reduce_stats(stats.result()), engine.learning_rate  # same on every rank
        if not math.isfinite(reduced["loss"]):
            if not skip_nonfinite:
                raise NonFiniteError(f"loss is {reduced['loss']}; the step was not applied")
            engine.skip_step()
            yield {**reduced, "grad_norm": float("nan"), "lr": learning_rate, "skipped": True}
            continue
        grad_norm = float(engine.step(skip_nonfinite=skip_nonfinite))
        yield {**reduced, "grad_norm": grad_norm, "lr": learning_rate, **({} if math.isfinite(grad_norm) else
                                                                          {"skipped": True})}
