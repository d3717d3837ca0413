"""The engine: the one interface through which the trainer backpropagates, steps and saves optimiser state.

`SingleProcessEngine` is plain PyTorch (AdamW, linear warmup, grad-norm clipping). A distributed engine implements
the same methods.
"""

from __future__ import annotations

import contextlib
import math

import torch

from fastgrpo.errors import NonFiniteError


def warmup_schedule(warmup_steps: int, decay=None):
    """LambdaLR factor: linear from 1/warmup to 1 over `warmup_steps` optimiser steps, then constant; times decay(),
    the current epoch's factor of train.lr_schedule, when given."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        return warm if decay is None else warm * decay()
    return factor


def epoch_lr_factor(schedule: str, epoch: int, epochs: int, min_ratio: float) -> float:
    """train.lr_schedule's factor for `epoch` (0-based) of `epochs`: f(epoch / epochs) with f(0) = 1 and f(1) =
    min_ratio, half a cosine or a straight line between them."""
    if schedule == "constant":
        return 1.0
    progress = epoch / epochs
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"train.lr_schedule must be 'constant', 'cosine' or 'linear', got {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * shape


def refresh_learning_rate(scheduler) -> None:
    """Set the optimiser's learning rates to the LambdaLR schedule's value at its current step (after the factor
    its lambdas read has changed), so the next optimiser step uses it."""
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class SingleProcessEngine:
    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, model: torch.nn.Module, train_config, step_constraints=()):
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=train_config.learning_rate, betas=(train_config.adam_beta1, train_config.adam_beta2),
            eps=train_config.adam_eps, weight_decay=train_config.weight_decay)
        self.lr_decay = 1.0  # the epoch's factor of train.lr_schedule (set_lr_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_schedule(train_config.warmup_steps, lambda: self.lr_decay))
        self.max_grad_norm = train_config.max_grad_norm
        self.step_constraints = tuple(step_constraints)  # fastgrpo.levers: before_step() / after_step() each step

    def backward(self, loss: torch.Tensor, is_last: bool = True) -> None:
        """Accumulate gradients of `loss`; is_last marks the final micro-batch before `step`."""
        loss.backward()

    def step(self, *, skip_nonfinite: bool = False) -> torch.Tensor:
        """Clip, step, advance the LR schedule, zero grads; returns the pre-clip total gradient norm.

        A non-finite norm raises NonFiniteError before the weights change, or with skip_nonfinite drops this step's
        gradients and leaves weights, optimiser and schedule as they were."""
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        if not math.isfinite(float(grad_norm)):  # the step's one host sync (the trainer logs the norm anyway)
            self.optimizer.zero_grad(set_to_none=True)
            if skip_nonfinite:
                return grad_norm
            raise NonFiniteError(f"gradient norm is {float(grad_norm)}; the step was not applied")
        for constraint in self.step_constraints:
            constraint.before_step()
        self.optimizer.step()
        for constraint in self.step_constraints:
            constraint.after_step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def skip_step(self) -> None:
        """Drop the accumulated gradients without stepping."""
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr_decay(self, factor: float) -> None:
        """The current epoch's factor of train.lr_schedule; the next optimiser step uses it."""
        self.lr_decay = factor
        refresh_learning_rate(self.lr_scheduler)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world_size, *shape): every rank's tensor, in rank order."""
        return tensor.unsqueeze(0)

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Statistics of one optimiser step combined over ranks (mean; min/max for ratio_min/ratio_max)."""
        return stats

    def barrier(self) -> None:
        pass

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimiser state (once the state exists)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = [t for p in params for t in self.optimizer.state.get(p, {}).values() if torch.is_tensor(t)]
        return {"param_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
                "grad_bytes": sum(p.numel() * p.element_size() for p in params),
                "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state)}

    @contextlib.contextmanager
    def full_model(self):
        yield self.model

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()}

    def save_state(self, directory) -> None:
        pass  # everything is in state_dict(), stored in trainer_state.pt

    def load_state(self, directory, state: dict, load_model) -> None:
        """Restore weights (load_model), optimiser and schedule from a checkpoint directory."""
        load_model(self.model, directory)
        self.optimizer.load_state_dict(state["engine"]["optimizer"])
        self.lr_scheduler.load_state_dict(state["engine"]["lr_scheduler"])
