"""The training loop: rollout -> steering reward -> group advantages -> clipped-ratio update -> log/checkpoint.

Run as `fastgrpo train [--config FILE] [key.sub=value ...]` or as a script path, `python fastgrpo/train.py ...`
(what DeepSpeed's launcher runs).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # script path: make `fastgrpo` importable, not this folder's modules
    import pathlib
    import sys
    sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastgrpo.allocator import keep_freed_memory
from fastgrpo.checkpoint import (check_deepspeed_state, find_checkpoint, list_checkpoints, load_checkpoint, load_unet,
                                 read_trainer_state, save_checkpoint, save_unet)
from fastgrpo.config import Config, config_to_dict, render_yaml, validate_world_size
from fastgrpo.devices import configure_cuda_math, resolve_device
from fastgrpo.diffusion import DDIMSchedule, Guidance, RolloutSettings, SdeWindow, configured_sampler
from fastgrpo.engine import SingleProcessEngine, epoch_lr_factor
from fastgrpo.epoch import EpochSamples, collect_epoch, gather_rewards, sync_device  # noqa: F401 (gather_rewards: API)
from fastgrpo.errors import NonFiniteError, TrainingInterrupted
from fastgrpo.levers import Levers, build_levers, step_constraints
from fastgrpo.lora import add_lora, load_lora, save_lora
from fastgrpo.grpo import UpdatePlan, group_kind_stats, policy_update
from fastgrpo.objectives import build_objective
from fastgrpo.metrics import MetricsWriter, save_image_grid
from fastgrpo.models import (DiffusionModels, configure_unet, encode_prompts, load_diffusion_models,
                             note_truncated_prompts, select_trainable)
from fastgrpo.prompts import PromptMixer, load_prompts
from fastgrpo.rewards import Reward, load_reward
from fastgrpo.rng import generator
from fastgrpo.rundir import claim_run_dir

EpochHook = Callable[[EpochSamples], dict]  # an epoch's samples -> keys added to its metrics.jsonl epoch line


@dataclass
class Session:
    """Everything one run holds: built once in `prepare`, used by every epoch."""

    config: Config
    device: torch.device
    models: DiffusionModels
    reward: Reward
    engine: object  # SingleProcessEngine or DeepSpeedEngine
    ref_unet: torch.nn.Module | None
    mixer: PromptMixer
    schedule: DDIMSchedule
    guidance: Guidance
    rollout: RolloutSettings
    uncond_embed: torch.Tensor  # (1, L, D)
    output_dir: Path
    objective: object              # fastgrpo.objectives: what the rollout keeps and how a micro-batch's loss is made
    window: SdeWindow | None       # sample.sde_window_*: the steps that are stochastic (None: every step)
    levers: Levers                 # fastgrpo.levers: advantage transforms and which rows the KL penalty covers
    epoch_hooks: tuple[EpochHook, ...] = ()  # each adds its keys to the epoch line (the toy worlds' pixel judge)

    @property
    def unet(self) -> torch.nn.Module:
        return self.engine.model


def _start_distributed(config: Config) -> int:
    """World size; with engine.deepspeed, torch.distributed is initialised through DeepSpeed first."""
    if config.engine.deepspeed is None:
        return 1
    from fastgrpo.engine_deepspeed import init_distributed
    init_distributed()
    return torch.distributed.get_world_size()


def resolve_precision(config: Config) -> str:
    """fp32, bf16 or fp16: engine.mixed_precision, where 'auto' means the DeepSpeed JSON's choice (else fp32)."""
    if config.engine.mixed_precision != "auto":
        return config.engine.mixed_precision
    if config.engine.deepspeed is None:
        return "fp32"
    from fastgrpo.engine_deepspeed import json_precision, read_deepspeed_config
    return json_precision(read_deepspeed_config(config.engine.deepspeed, "auto"))


def _build_engine(config: Config, unet: torch.nn.Module, world_size: int, device: torch.device, constraints: list):
    if config.engine.deepspeed is None:
        return SingleProcessEngine(unet, config.train, constraints)  # (validation keeps constraints off DeepSpeed)
    from fastgrpo.engine_deepspeed import DeepSpeedEngine, read_deepspeed_config

    t = config.train
    micro_batches = max(1, t.samples_per_step // world_size // t.batch_size) * build_objective(config).units_per_sample
    ds_config = read_deepspeed_config(config.engine.deepspeed, config.engine.mixed_precision)
    return DeepSpeedEngine(unet, t, ds_config, micro_batches, device)


def prepare(config: Config, epoch_hooks: Sequence[EpochHook] = ()) -> tuple[Session, int, int]:
    """Check inputs (before any model loads), load models, restore a checkpoint. Returns (session, epoch, step)."""
    run, data = config.run, config.data
    output_dir = Path(run.output_dir)
    checkpoint = find_checkpoint(output_dir, run.resume) if run.resume else None
    saved_state = read_trainer_state(checkpoint) if checkpoint is not None else None  # fails before models load
    if checkpoint is not None and config.engine.deepspeed is not None:
        check_deepspeed_state(checkpoint)
    mixer = PromptMixer(load_prompts(data.safe_prompts, data.safe_column),
                        load_prompts(data.unsafe_prompts, data.unsafe_column),
                        data.unsafe_fraction, config.sample.prompts_per_epoch, run.seed)
    device = resolve_device(run.device)
    configure_cuda_math(device, allow_tf32=config.engine.allow_tf32)
    world_size = _start_distributed(config)
    validate_world_size(config, world_size)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(run.seed)
    precision = resolve_precision(config)
    models = load_diffusion_models(config.model.pretrained, device=device, revision=config.model.revision,
                                   frozen_dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                                                 "fp16": torch.float16}[precision])
    configure_unet(models.unet, attention=config.engine.attention,
                   gradient_checkpointing=config.engine.gradient_checkpointing)
    if world_size == 1 or torch.distributed.get_rank() == 0:
        note_truncated_prompts(models, mixer.safe + mixer.unsafe)
    reward = load_reward(config.reward, device, dtype=models.vae.dtype)
    ref_unet = None
    if config.lora.rank > 0:
        add_lora(models.unet, config.lora)  # the KL reference is this UNet with adapters disabled
    else:
        select_trainable(models.unet, config.train.trainable_modules)
        if config.train.kl_coef > 0:
            ref_unet = copy.deepcopy(models.unet).requires_grad_(False)
    engine = _build_engine(config, models.unet, world_size, device,
                           step_constraints(config, models.unet, models, mixer))
    start_epoch, global_step = 0, 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine, load_lora if config.lora.rank > 0 else load_unet, saved_state)
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
    sample = config.sample
    schedule, guidance = configured_sampler(sample, models, device, backend=config.train.ops_backend,
                                            autocast_bf16=precision == "bf16" and config.engine.deepspeed is None)
    session = Session(
        config=config, device=device, models=models, reward=reward, engine=engine, ref_unet=ref_unet, mixer=mixer,
        schedule=schedule, guidance=guidance,
        rollout=RolloutSettings(models.latent_shape(sample.resolution), sample.group_size, sample.batch_size,
                                sample.same_noise_per_group, run.seed, keep_noise=config.train.ratio_norm),
        uncond_embed=encode_prompts(models, [""]), output_dir=output_dir, objective=build_objective(config),
        window=SdeWindow(sample.sde_window_size, sample.sde_window_start, sample.sde_window_schedule,
                         sample.sde_window_shift_every) if sample.sde_window_size else None,
        levers=build_levers(config), epoch_hooks=tuple(epoch_hooks))
    return session, start_epoch, global_step


def update_epoch(s: Session, samples: EpochSamples):
    """The inner epochs of clipped-ratio updates on this rank's samples; yields each optimiser step's statistics."""
    t, epoch = s.config.train, samples.epoch
    s.unet.train()
    kept = torch.nonzero(samples.rows(samples.keep).cpu()).squeeze(1)
    first = UpdatePlan(kept, samples.batch.shard.steps[kept])  # the global plan: the same samples and units per
    first.order, first.steps = first.order.to(s.device), first.steps.to(s.device)  # optimiser step at any world size
    loss_fn = s.objective.loss_fn(s, samples, samples.rows(samples.advantages), first)
    for inner in range(t.num_inner_epochs):
        plan = first
        if inner > 0:
            plan = s.objective.plan(kept, generator(s.config.run.seed, "plan", epoch, inner, s.engine.rank),
                                    samples.batch.window)
            plan.order, plan.steps = plan.order.to(s.device), plan.steps.to(s.device)
        yield from policy_update(s.engine, loss_fn, plan, batch_size=t.batch_size,
                                 samples_per_step=t.samples_per_step // s.engine.world_size,
                                 skip_nonfinite=t.on_nonfinite == "skip")


def _mean_where(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None


def run_epoch(s: Session, epoch: int, global_step: int, writer) -> tuple[dict, int]:
    """One epoch end to end; writes its step lines, returns (epoch record, global step)."""
    t = s.config.train
    s.engine.set_lr_decay(epoch_lr_factor(t.lr_schedule, epoch, s.config.run.epochs, t.lr_min_ratio))
    samples = collect_epoch(s, epoch)
    t2 = time.perf_counter()
    for stats in update_epoch(s, samples):
        global_step += 1
        writer.log({"epoch": epoch, "step": global_step, **stats}, kind="train")
    sync_device(s.device)
    t3 = time.perf_counter()
    rewards, advantages, is_unsafe = samples.rewards, samples.advantages, samples.batch.is_unsafe
    record = {"epoch": epoch, "step": global_step, "reward_mean": float(rewards.mean()),
              "reward_std": float(rewards.std()), "reward_mean_safe": _mean_where(rewards, ~is_unsafe),
              "reward_mean_unsafe": _mean_where(rewards, is_unsafe), "num_samples": int(rewards.shape[0]),
              "num_trained_samples": int(samples.keep.sum()), "rollout_s": samples.rollout_s,
              "reward_s": samples.reward_s, "train_s": t3 - t2,
              **group_kind_stats(rewards, advantages, is_unsafe, s.config.sample.group_size)}
    for hook in s.epoch_hooks:
        record.update(hook(samples))
    writer.log(record, kind="epoch")
    if s.config.run.num_sample_images and s.engine.is_main:
        order = samples.sample_ids.argsort()[:s.config.run.num_sample_images]   # this rank's samples, by global id
        save_image_grid(samples.trajectories.images[order], s.output_dir / "samples" / f"epoch_{epoch:04d}.png")
    return record, global_step


def log_memory(s: Session, epoch: int, global_step: int, writer) -> None:
    """One line per rank with the bytes it holds for parameters, gradients and optimiser state."""
    report = s.engine.memory_report()
    names = sorted(report)
    table = s.engine.all_gather(torch.tensor([report[n] for n in names], dtype=torch.float64, device=s.device))
    for rank, values in enumerate(table.tolist()):
        writer.log({"epoch": epoch, "step": global_step, "rank": rank, **{n: int(v) for n, v in zip(names, values)}},
                   kind="memory")


def _model_saver(config: Config):
    if config.lora.rank == 0:
        return save_unet
    return lambda unet, directory: save_lora(unet, directory, export_merged=config.lora.export_merged)


class _NoWriter:
    """Ranks other than 0 write no logs."""

    def log(self, record: dict, *, kind: str) -> None:
        pass

    def close(self) -> None:
        pass


def train(config: Config, epoch_hooks: Sequence[EpochHook] = ()) -> Path:
    """Run (or resume) training as configured; returns the output directory. `epoch_hooks` add keys to each epoch
    line (the command line passes `fastgrpo.commandline.epoch_hooks(config)`)."""
    run = config.run
    with claim_run_dir(run.output_dir, resume=run.resume, overwrite=run.overwrite,
                       main_process=os.environ.get("RANK", "0") == "0"):
        try:
            return _train(config, epoch_hooks)
        except KeyboardInterrupt:
            saved = list_checkpoints(run.output_dir)
            raise TrainingInterrupted(f"the newest checkpoint is {saved[-1][1]} (resume with run.resume=latest)"
                                      if saved else "no checkpoint had been saved yet") from None


def _train(config: Config, epoch_hooks: Sequence[EpochHook]) -> Path:
    session, start_epoch, global_step = prepare(config, epoch_hooks)
    output_dir, main_rank = session.output_dir, session.engine.is_main
    writer = _NoWriter()
    if main_rank:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(render_yaml(config), encoding="utf-8")
        writer = MetricsWriter(output_dir, tensorboard=config.run.tensorboard,
                               resume_epoch=start_epoch if config.run.resume else None)
    from tqdm.auto import tqdm

    progress = tqdm(range(start_epoch, config.run.epochs), initial=start_epoch, total=config.run.epochs,
                    desc="fastgrpo", unit="epoch", disable=not (config.run.progress and main_rank))
    try:
        for epoch in progress:
            try:
                record, global_step = run_epoch(session, epoch, global_step, writer)
            except NonFiniteError as error:
                saved = list_checkpoints(output_dir)
                kept = f"the newest checkpoint is {saved[-1][1]}" if saved else "no checkpoint was saved"
                raise NonFiniteError(f"epoch {epoch}: {error}; stopped before saving ({kept}; a lower "
                                     "train.learning_rate may help)") from None
            progress.set_postfix(reward=f"{record['reward_mean']:.4f}", step=global_step)
            if epoch == 0:  # once per run (a resumed run keeps the first run's lines); every rank takes part
                log_memory(session, epoch, global_step, writer)
            if (epoch + 1) % config.run.save_every == 0 or epoch + 1 == config.run.epochs:
                state = {"global_step": global_step, "config": config_to_dict(config)}
                save_checkpoint(output_dir, epoch, session.engine, state, config.run.keep_last,
                                save_model=_model_saver(config))
    finally:
        progress.close()
        writer.close()
    return output_dir


def run_from_config(config: Config, epoch_hooks: Sequence[EpochHook] = ()) -> int:
    output_dir = train(config, epoch_hooks)
    print(f"fastgrpo: done; outputs in {output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`deepspeed fastgrpo/train.py [--config ...] [key=value ...]`: the same as `fastgrpo train`."""
    import argparse

    from fastgrpo.commandline import add_train_arguments, config_from_args, epoch_hooks, run_command

    parser = argparse.ArgumentParser(prog="fastgrpo/train.py", description="GRPO safety post-training (one rank).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    def run() -> int:
        config = config_from_args(args)
        return run_from_config(config, epoch_hooks(config))

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
