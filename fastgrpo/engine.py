"""The engine: the one interface through which the trainer backpropagates, steps and saves optimiser state.

`SingleProcessEngine` is plain PyTorch (AdamW, linear warmup, grad-norm clipping). A distributed engine implements
the same methods.
"""

from __future__ import annotations

import torch


def warmup_schedule(warmup_steps: int):
    """LambdaLR factor: linear from 1/warmup to 1 over `warmup_steps` optimiser steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class SingleProcessEngine:
    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, model: torch.nn.Module, train_config):
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=train_config.learning_rate, betas=(train_config.adam_beta1, train_config.adam_beta2),
            eps=train_config.adam_eps, weight_decay=train_config.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                              warmup_schedule(train_config.warmup_steps))
        self.max_grad_norm = train_config.max_grad_norm

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip, step, advance the LR schedule, zero grads; returns the pre-clip total gradient norm."""
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
