"""Triton kernels for diffusion GRPO (torch + triton only). Use them through `fastgrpo.ops`, which validates
inputs, builds the per-sample step tables (DDIM, flow-matching SDE) and wires autograd; these launchers assume valid
inputs."""

from fastgrpo_kernels.group_advantages import group_advantages
from fastgrpo_kernels.grpo_loss import grpo_loss_backward, grpo_loss_forward
from fastgrpo_kernels.matching_loss import matching_loss_backward, matching_loss_forward
from fastgrpo_kernels.nft_loss import nft_loss_backward, nft_loss_forward
from fastgrpo_kernels.step_logprob import step_logprob_backward, step_logprob_forward

__all__ = ["step_logprob_forward", "step_logprob_backward", "group_advantages", "grpo_loss_forward",
           "grpo_loss_backward", "matching_loss_forward", "matching_loss_backward", "nft_loss_forward", "nft_loss_backward"]
