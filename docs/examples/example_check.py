"""What both drop-in examples check after their tiny rollout: the training-side recompute equals the rollout's
log-probs exactly, and its gradient reaches the model through the fused op."""

from __future__ import annotations

import torch

from fastgrpo import ops


def summarise(name: str, model: torch.nn.Module, log_probs: torch.Tensor, again: torch.Tensor, op: str) -> int:
    """Print one line; 0 when the recompute matches and the model got a nonzero gradient, else 1."""
    again.sum().backward()
    grad = sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    difference = (again.detach() - log_probs).abs().max().item()
    print(f"{name}: {log_probs.shape[1]} steps, mean log-prob {log_probs.mean().item():+.4f}, recomputed max |diff| "
          f"{difference:.2e}, |grad| {float(grad):.3e}, backend {ops.explain(op, log_probs.device)[0]}")
    return 0 if difference == 0.0 and float(grad) > 0 else 1
