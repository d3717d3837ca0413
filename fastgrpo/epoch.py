"""One epoch's samples: prompts -> rollout -> rewards (gathered over ranks) -> group advantages -> keep mask.

Training (`train.run_epoch`) and `gradient_snr` both call `collect_epoch`; nothing else chains these steps.

Index spaces: a *global sample id* n in [0, N) names a sample of the whole epoch (its group is n // G, on every
rank); this rank's trajectories hold its share in *plan order*: trajectory row r is global sample `sample_ids[r]`.
`EpochSamples.rows` converts a global (N,) tensor to this rank's rows; the update plan indexes rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fastgrpo.diffusion import Trajectories, sample_trajectories
from fastgrpo.errors import NonFiniteError
from fastgrpo.grpo import UpdatePlan, epoch_advantages, shard_plan
from fastgrpo.models import encode_prompts
from fastgrpo.rng import generator


@dataclass
class EpochBatch:
    """One epoch's prompts and update plan, as this rank sees them."""

    prompts: list[str]              # unique prompt texts of the epoch (all ranks)
    prompt_embeds: torch.Tensor     # (U, L, D)
    sample_prompt: torch.Tensor     # (N,) global: row of prompt_embeds for each global sample
    is_unsafe: torch.Tensor         # (N,) global
    shard: UpdatePlan               # this rank's samples (global ids, in plan order) and their trained units
    stochastic: tuple[bool, ...] | None = None  # (S,) the sampler steps that draw noise (an SDE window); None: all
    window: tuple[int, int] | None = None       # the SDE window's (first step, size) this epoch


def epoch_batch(s, epoch: int) -> EpochBatch:
    """The epoch's prompts and the global update plan, and this rank's share of it (see grpo.shard_plan)."""
    config = s.config
    group = config.sample.group_size
    batch = s.mixer.epoch(epoch)
    unique = list(dict.fromkeys(batch.prompts))
    row = {prompt: i for i, prompt in enumerate(unique)}
    sample_prompt = torch.tensor([row[p] for p in batch.prompts]).repeat_interleave(group)      # (N,)
    stochastic, window = None, None
    if s.window is not None:
        first = s.window.first_step(epoch, s.schedule.num_steps, config.run.seed)
        stochastic, window = s.window.steps(epoch, s.schedule.num_steps, config.run.seed), (first, s.window.size)
    plan = s.objective.plan(torch.arange(sample_prompt.shape[0]), generator(config.run.seed, "plan", epoch, 0),
                            window)
    shard = shard_plan(plan, s.engine.rank, s.engine.world_size, config.train.samples_per_step)
    return EpochBatch(unique, encode_prompts(s.models, unique), sample_prompt.to(s.device),
                      batch.is_unsafe.repeat_interleave(group).to(s.device), shard, stochastic, window)


def gather_rewards(s, sample_ids: torch.Tensor, rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(N,) rewards of every rank's samples, indexed by global sample id."""
    ids = s.engine.all_gather(sample_ids.to(s.device)).flatten()
    values = s.engine.all_gather(rewards).flatten()
    return torch.empty(num_samples, dtype=values.dtype, device=s.device).index_copy_(0, ids, values)


@dataclass
class EpochSamples:
    """What an epoch's update needs: this rank's trajectories and the epoch's rewards and advantages."""

    epoch: int
    batch: EpochBatch
    trajectories: Trajectories  # this rank's samples; row r is global sample sample_ids[r]
    sample_ids: torch.Tensor    # (M,) long on the device: global id of each trajectory row
    rewards: torch.Tensor       # (N,) global
    advantages: torch.Tensor    # (N,) global, after the levers' advantage transforms
    keep: torch.Tensor          # (N,) bool global: samples the update trains on (train.drop_zero_std_groups)
    rollout_s: float
    reward_s: float

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) indexed by global sample id -> (M,) indexed by this rank's trajectory row."""
        return values[self.sample_ids]

    def row_prompts(self) -> list[str]:
        """The prompt text of each trajectory row."""
        return [self.batch.prompts[i] for i in self.batch.sample_prompt[self.sample_ids].tolist()]


def sync_device(device: torch.device) -> None:
    """Wait for the device (CUDA) so wall times cover the work; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def collect_epoch(s, epoch: int) -> EpochSamples:
    """Roll out this rank's samples of `epoch` with the current UNet, score them, and turn the gathered rewards into
    group advantages. Raises NonFiniteError on a non-finite reward."""
    t0 = time.perf_counter()
    batch = epoch_batch(s, epoch)
    sample_ids = batch.shard.order.to(s.device)                                               # (M,) global ids
    s.unet.eval()
    trajectories = sample_trajectories(s.unet, s.models.vae, s.schedule, batch.prompt_embeds, s.uncond_embed,
                                       batch.sample_prompt[sample_ids], batch.shard.order, s.guidance, s.rollout,
                                       epoch, batch.stochastic)
    sync_device(s.device)
    t1 = time.perf_counter()
    local_rewards = s.reward(trajectories.images, batch.prompts, trajectories.prompt_index)
    rewards = gather_rewards(s, sample_ids, local_rewards, batch.sample_prompt.shape[0])        # (N,)
    if not bool(torch.isfinite(rewards).all()):
        raise NonFiniteError(f"{int((~torch.isfinite(rewards)).sum())} of {rewards.shape[0]} rewards are not finite "
                             "(check the reward model and the images)")
    sync_device(s.device)
    t = s.config.train
    advantages, keep = epoch_advantages(rewards, s.config.sample.group_size, std=t.adv_std, clip=t.adv_clip_max,
                                        drop_zero_std=t.drop_zero_std_groups, backend=t.ops_backend)
    advantages = s.levers.transform_advantages(advantages, batch.is_unsafe, epoch)
    return EpochSamples(epoch, batch, trajectories, sample_ids, rewards, advantages, keep, t1 - t0,
                        time.perf_counter() - t1)
