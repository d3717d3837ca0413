"""Triton kernels for diffusion GRPO (torch + triton only). Use them through `fastgrpo.ops`, which validates
inputs, computes the per-sample DDIM coefficients and wires autograd; these launchers assume valid inputs."""

from fastgrpo_kernels.ddim_logprob import ddim_logprob_backward, ddim_logprob_forward
from fastgrpo_kernels.group_advantages import group_advantages
from fastgrpo_kernels.grpo_loss import grpo_loss_backward, grpo_loss_forward

__all__ = ["ddim_logprob_forward", "ddim_logprob_backward", "group_advantages", "grpo_loss_forward",
           "grpo_loss_backward"]
