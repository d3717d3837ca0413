"""Triton kernel: group-normalised advantages for a whole epoch in one launch.

    advantages = clip((r - mean_group) / (std + eps), -clip, clip)

std is each group's (or, with GLOBAL_STD, all N rewards') sample std (unbiased) or population std.
Grid (num_groups,): each program loads its group (G <= BLOCK_G). With GLOBAL_STD every program also reduces all N
rewards in BLOCK_N chunks (N is an epoch's sample count, a few thousand at most, so the repeat is cheap and keeps a
single launch and a fixed reduction order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastgrpo_kernels.step_logprob import launch, scalar_params

BLOCK_N = 1024


@triton.jit
def _group_advantages_kernel(rewards_ptr, out_ptr, n_rewards, group_size, eps, clip, params_ptr,
                             UNBIASED: tl.constexpr, GLOBAL_STD: tl.constexpr, HAS_CLIP: tl.constexpr,
                             BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
                             PARAMS_IN_MEMORY: tl.constexpr):
    if PARAMS_IN_MEMORY:  # fp64: float arguments would be rounded to fp32
        eps = tl.load(params_ptr)
        clip = tl.load(params_ptr + 1)
    group = tl.program_id(0)
    idx = group.to(tl.int64) * group_size + tl.arange(0, BLOCK_G)
    mask = tl.arange(0, BLOCK_G) < group_size
    rewards = tl.load(rewards_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    mean = tl.sum(rewards, axis=0) / group_size
    centered = tl.where(mask, rewards - mean, 0.0)
    if GLOBAL_STD:
        total = tl.zeros((BLOCK,), dtype=COMPUTE)
        for start in range(0, n_rewards, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            total += tl.load(rewards_ptr + cols, mask=cols < n_rewards, other=0.0).to(COMPUTE)
        global_mean = tl.sum(total, axis=0) / n_rewards
        squares = tl.zeros((BLOCK,), dtype=COMPUTE)
        for start in range(0, n_rewards, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            values = tl.load(rewards_ptr + cols, mask=cols < n_rewards, other=0.0).to(COMPUTE)
            squares += tl.where(cols < n_rewards, (values - global_mean) * (values - global_mean), 0.0)
        count = n_rewards
        sum_squares = tl.sum(squares, axis=0)
    else:
        count = group_size
        sum_squares = tl.sum(centered * centered, axis=0)
    if UNBIASED:
        variance = sum_squares / tl.maximum(count - 1, 1)
    else:
        variance = sum_squares / count
    advantages = centered / (tl.sqrt(variance) + eps)
    if HAS_CLIP:
        advantages = tl.minimum(tl.maximum(advantages, -clip), clip)
    tl.store(out_ptr + idx, advantages, mask=mask)


def group_advantages(rewards: torch.Tensor, group_size: int, *, global_std: bool, unbiased: bool, clip, eps: float,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """Launch over rewards (N,) in consecutive groups of group_size; returns (N,) in compute_dtype."""
    rewards = rewards.contiguous()
    out = torch.empty(rewards.shape, dtype=compute_dtype, device=rewards.device)
    num_groups = rewards.shape[0] // group_size
    clip_value = float(clip if clip is not None else 0.0)
    params, in_memory = scalar_params([eps, clip_value], compute_dtype, rewards.device)
    launch(_group_advantages_kernel, (num_groups,), rewards.device,
        rewards, out, rewards.shape[0], group_size, float(eps), clip_value, params if in_memory else out,
        PARAMS_IN_MEMORY=in_memory, UNBIASED=unbiased, GLOBAL_STD=global_std, HAS_CLIP=clip is not None,
        BLOCK_G=triton.next_power_of_2(group_size), BLOCK=BLOCK_N,
        COMPUTE=tl.float64 if compute_dtype == torch.float64 else tl.float32)
    return out
