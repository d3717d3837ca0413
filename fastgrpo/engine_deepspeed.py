"""The DeepSpeed engine: ZeRO stage 0-3 sharding of optimiser state (and gradients, parameters), with the
optimiser, gradient clipping and precision owned by DeepSpeed. Same interface as `SingleProcessEngine`.

The packaged configs (`zero1`, `zero2`, `zero3` in fastgrpo/configs/deepspeed/) hold only the ZeRO and
precision settings; batch sizes, gradient accumulation and clipping come from the trainer's config so the
samples x timesteps accounting stays the trainer's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from pathlib import Path

import torch

from fastgrpo.engine import refresh_learning_rate, warmup_schedule
from fastgrpo.errors import ConfigError, NonFiniteError

PACKAGED = Path(__file__).parent / "configs" / "deepspeed"
STATE_DIR = "deepspeed"


def read_deepspeed_config(name_or_path: str, mixed_precision: str) -> dict:
    """A packaged config name (zero1/zero2/zero3) or a JSON path; precision sections set from mixed_precision."""
    path = PACKAGED / f"{name_or_path}.json" if (PACKAGED / f"{name_or_path}.json").is_file() else Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"engine.deepspeed: {name_or_path!r} is neither zero1/zero2/zero3 nor a JSON file")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigError(f"engine.deepspeed: {name_or_path!r} is not valid JSON ({error})") from None
    if mixed_precision != "auto":
        config["bf16"] = {"enabled": mixed_precision == "bf16"}
        config["fp16"] = {"enabled": mixed_precision == "fp16", "initial_scale_power": 16}
    return config


def json_precision(config: dict) -> str:
    """The precision a DeepSpeed config trains in: bf16, fp16 or fp32."""
    if config.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if config.get("fp16", {}).get("enabled") else "fp32"


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed; without a launcher, as a world of one."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()


class DeepSpeedEngine:
    """device: this rank's device (cuda:LOCAL_RANK on GPUs). Every tensor handed to a collective lives there: NCCL
    takes CUDA tensors only, and the current CUDA device decides where DeepSpeed puts the model."""

    def __init__(self, model: torch.nn.Module, train_config, ds_config: dict, micro_batches_per_step: int,
                 device: torch.device):
        import deepspeed

        self.device = device
        self.world_size = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        self.is_main = self.rank == 0
        config = dict(ds_config)
        config.update(train_micro_batch_size_per_gpu=train_config.batch_size,
                      gradient_accumulation_steps=micro_batches_per_step,
                      train_batch_size=train_config.batch_size * micro_batches_per_step * self.world_size,
                      gradient_clipping=train_config.max_grad_norm)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=train_config.learning_rate,
                                      betas=(train_config.adam_beta1, train_config.adam_beta2),
                                      eps=train_config.adam_eps, weight_decay=train_config.weight_decay)
        self.lr_decay = 1.0  # the epoch's factor of train.lr_schedule (set_lr_decay)
        schedule = warmup_schedule(train_config.warmup_steps, lambda: self.lr_decay)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.model = self.engine.module
        self.zero_stage = self.engine.zero_optimization_stage()

    def backward(self, loss: torch.Tensor, is_last: bool = True) -> None:
        # DeepSpeed counts micro-steps itself (gradient_accumulation_steps = micro-batches per optimiser step):
        # every micro-batch but the last is followed by engine.step(), which only advances that count.
        self.engine.backward(loss, scale_wrt_gas=False)
        # The trainer calls the module, not engine.forward, which is where DeepSpeed marks the previous backward
        # as done; ZeRO-3 counts micro-steps there (without it each backward overwrites the accumulated gradient).
        if hasattr(self.optimizer, "clear_backward_seen_flag"):
            self.optimizer.clear_backward_seen_flag()
        if not is_last:
            self.engine.step()

    def step(self, *, skip_nonfinite: bool = False) -> torch.Tensor:
        """A non-finite gradient norm raises NonFiniteError after DeepSpeed's step (which owns the norm); the
        trainer then stops without saving, so no checkpoint holds the result."""
        if skip_nonfinite:
            raise ConfigError("train.on_nonfinite=skip needs one process")
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's gradient-accumulation count is out of step with the trainer's plan")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise NonFiniteError(f"gradient norm is {float(norm)}")
        return torch.tensor(float("nan") if norm is None else float(norm))

    def set_lr_decay(self, factor: float) -> None:
        """The current epoch's factor of train.lr_schedule; the next optimiser step uses it."""
        self.lr_decay = factor
        refresh_learning_rate(self.lr_scheduler)

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world_size, *shape) on this rank's device; `tensor` must live there (a host tensor would fail on NCCL)."""
        if tensor.device != self.device:
            raise ValueError(f"all_gather: tensor on {tensor.device}, but this rank communicates on {self.device}")
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, tensor.contiguous())
        return torch.stack(gathered)

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        names = sorted(stats)
        values = self.all_gather(torch.tensor([stats[n] for n in names], dtype=torch.float64,
                                              device=self.device)).cpu()  # (W, K)
        reduced = {n: float(values[:, i].mean()) for i, n in enumerate(names)}
        if "ratio_min" in stats:
            reduced["ratio_min"] = float(values[:, names.index("ratio_min")].min())
        if "ratio_max" in stats:
            reduced["ratio_max"] = float(values[:, names.index("ratio_max")].max())
        return reduced

    def barrier(self) -> None:
        torch.distributed.barrier()

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds: its parameter shard (ZeRO-3) or full parameters, the gradient partition its
        optimiser steps, and that optimiser's state."""
        def nbytes(tensor):
            return tensor.numel() * tensor.element_size()

        params = sum(nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else nbytes(p) for p in self.model.parameters())
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        # ZeRO-3 keeps the rank's fp32 partition in fp32_partitioned_groups_flat; stages 1-2 in the param groups
        owned = getattr(self.optimizer, "fp32_partitioned_groups_flat", None) or \
            [p for group in inner.param_groups for p in group["params"]]
        state = [t for entry in inner.state.values() for t in entry.values() if torch.is_tensor(t) and t.dim() > 0]
        return {"param_bytes": params, "grad_bytes": sum(nbytes(p) for p in owned),
                "optimizer_state_bytes": sum(nbytes(t) for t in state)}

    @contextlib.contextmanager
    def full_model(self):
        """The module with full parameters on every rank (ZeRO-3 gathers them for the duration)."""
        if self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                yield self.model
        else:
            yield self.model

    def state_dict(self) -> dict:
        return {}  # the optimiser and schedule live in the DeepSpeed checkpoint (save_state)

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / STATE_DIR), tag="state")

    def load_state(self, directory: Path, state: dict, load_model=None) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / STATE_DIR), tag="state")
        if path is None:
            raise ConfigError(f"run.resume: {directory} holds no DeepSpeed state (was it saved by a DeepSpeed run?)")
