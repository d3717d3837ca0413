"""The training loop: rollout -> steering reward -> group advantages -> clipped-ratio update -> log/checkpoint.

Run as `fastgrpo train [--config FILE] [key.sub=value ...]` or as a script path, `python fastgrpo/train.py ...`
(what DeepSpeed's launcher runs).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # script path: make `fastgrpo` importable, not this folder's modules
    import pathlib
    import sys
    sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

import contextlib
import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastgrpo.allocator import keep_freed_memory
from fastgrpo.checkpoint import (check_deepspeed_state, find_checkpoint, list_checkpoints, load_checkpoint, load_unet,
                                 read_trainer_state, save_checkpoint, save_unet)
from fastgrpo.config import Config, config_to_dict, render_yaml, validate_world_size
from fastgrpo.devices import configure_cuda_math, resolve_device
from fastgrpo.diffusion import DDIMSchedule, Guidance, RolloutSettings, recompute_log_probs, sample_trajectories
from fastgrpo.engine import SingleProcessEngine
from fastgrpo.errors import NonFiniteError, TrainingInterrupted
from fastgrpo.lora import adapters_disabled, add_lora, has_lora, load_lora, save_lora
from fastgrpo.grpo import (LossSettings, UpdatePlan, epoch_advantages, group_kind_stats, plan_update, policy_update,
                           shard_plan)
from fastgrpo.metrics import MetricsWriter, save_image_grid
from fastgrpo.models import (DiffusionModels, configure_unet, encode_prompts, load_diffusion_models,
                             note_truncated_prompts, select_trainable)
from fastgrpo.prompts import PromptMixer, load_prompts
from fastgrpo.rewards import Reward, load_reward
from fastgrpo.rng import generator
from fastgrpo.rundir import claim_run_dir


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
    judge: Callable | None = None  # (images, prompts, is_unsafe) -> judged rates, for toy-world runs

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


def _build_engine(config: Config, unet: torch.nn.Module, world_size: int, device: torch.device):
    if config.engine.deepspeed is None:
        return SingleProcessEngine(unet, config.train)
    from fastgrpo.engine_deepspeed import DeepSpeedEngine, read_deepspeed_config

    t, s = config.train, config.sample
    trained_steps = max(1, round(s.num_steps * t.timestep_fraction))
    micro_batches = max(1, t.samples_per_step // world_size // t.batch_size) * trained_steps
    ds_config = read_deepspeed_config(config.engine.deepspeed, config.engine.mixed_precision)
    return DeepSpeedEngine(unet, t, ds_config, micro_batches, device)


def prepare(config: Config) -> tuple[Session, int, int]:
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
    engine = _build_engine(config, models.unet, world_size, device)
    if config.train.preserve_prompts == "safe":
        from fastgrpo.preserve import preserved_subspace
        engine.update_projection = preserved_subspace(models.unet, models, mixer.safe, config.train.preserve_energy,
                                                      unsafe_prompts=mixer.unsafe,
                                                      directions=config.train.update_directions)
    start_epoch, global_step = 0, 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, engine, load_lora if config.lora.rank > 0 else load_unet, saved_state)
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
    sample = config.sample
    autocast = precision == "bf16" and config.engine.deepspeed is None
    session = Session(
        config=config, device=device, models=models, reward=reward, engine=engine, ref_unet=ref_unet, mixer=mixer,
        schedule=DDIMSchedule.from_scheduler(models.scheduler, sample.num_steps, device),
        guidance=Guidance(sample.eta, sample.guidance_scale, models.prediction_type, config.train.ops_backend,
                          autocast),
        rollout=RolloutSettings(models.latent_shape(sample.resolution), sample.group_size, sample.batch_size,
                                sample.same_noise_per_group, run.seed, keep_noise=config.train.ratio_norm),
        uncond_embed=encode_prompts(models, [""]), output_dir=output_dir, judge=_toyworld_judge(config))
    return session, start_epoch, global_step


def _toyworld_judge(config: Config):
    """The toy world's pixel judge for the epoch lines, when the run trains a packaged toy-world model."""
    from fastgrpo.toyworld import builtin_world

    toy = builtin_world(config.model.pretrained)
    if toy is None:
        return None
    from fastgrpo.toyworld.monitor import EpochJudge
    return EpochJudge(toy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EpochBatch:
    """One epoch's samples as this rank sees them."""

    prompts: list[str]              # unique prompt texts of the epoch (all ranks)
    prompt_embeds: torch.Tensor     # (U, L, D)
    sample_prompt: torch.Tensor     # (N,) global: row of prompt_embeds for each global sample
    is_unsafe: torch.Tensor         # (N,) global
    shard: UpdatePlan               # this rank's samples (global ids, in plan order) and their trained steps


def epoch_batch(s: Session, epoch: int) -> EpochBatch:
    """The epoch's prompts and the global update plan, and this rank's share of it (see grpo.shard_plan)."""
    group, t = s.config.sample.group_size, s.config.train
    batch = s.mixer.epoch(epoch)
    unique = list(dict.fromkeys(batch.prompts))
    row = {prompt: i for i, prompt in enumerate(unique)}
    sample_prompt = torch.tensor([row[p] for p in batch.prompts]).repeat_interleave(group)      # (N,)
    plan = plan_update(torch.arange(sample_prompt.shape[0]), s.schedule.num_steps, t.timestep_fraction,
                       generator(s.config.run.seed, "plan", epoch, 0), tuple(t.timestep_range))
    shard = shard_plan(plan, s.engine.rank, s.engine.world_size, t.samples_per_step)
    return EpochBatch(unique, encode_prompts(s.models, unique), sample_prompt.to(s.device),
                      batch.is_unsafe.repeat_interleave(group).to(s.device), shard)


def gather_rewards(s: Session, sample_ids: torch.Tensor, rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(N,) rewards of every rank's samples, indexed by global sample id."""
    ids = s.engine.all_gather(sample_ids.to(s.device)).flatten()
    values = s.engine.all_gather(rewards).flatten()
    return torch.empty(num_samples, dtype=values.dtype, device=s.device).index_copy_(0, ids, values)


def update_epoch(s: Session, epoch: int, trajectories, batch: EpochBatch, advantages, keep):
    """The inner epochs of clipped-ratio updates on this rank's samples; yields each optimiser step's statistics.

    advantages, keep: (M,) for this rank's samples (trajectory order)."""
    t = s.config.train
    s.unet.train()

    def log_probs_under(unet, reference=None, ratio_norm=False):
        return lambda samples, steps: recompute_log_probs(unet, trajectories, batch.prompt_embeds, s.uncond_embed,
                                                          s.schedule, s.guidance, samples, steps, reference=reference,
                                                          ratio_norm=ratio_norm)

    reference = None   # factory of a context yielding the KL reference: the base UNet
    if s.ref_unet is not None:
        reference = lambda: contextlib.nullcontext(s.ref_unet)  # noqa: E731
    elif has_lora(s.unet) and t.kl_coef > 0:
        reference = lambda: adapters_disabled(s.unet)  # noqa: E731
    policy_fn, ref_fn = log_probs_under(s.unet, ratio_norm=t.ratio_norm), None
    if reference is not None and t.kl_estimator == "mean":
        policy_fn = log_probs_under(s.unet, reference, ratio_norm=t.ratio_norm)
        if t.kl_prompts == "safe":  # the KL of unsafe prompts' samples is zeroed (and so is its gradient)
            # `samples` are rows of this rank's trajectories, which are in shard order: read the mask that way
            weight, full_fn = (~batch.is_unsafe[batch.shard.order.to(batch.is_unsafe.device)]).float(), policy_fn

            def policy_fn(samples, steps):
                log_probs, kl, *norm = full_fn(samples, steps)
                return log_probs, kl * weight[samples], *norm
    elif reference is not None:
        def ref_fn(samples, steps):
            with reference() as ref_unet:
                return log_probs_under(ref_unet)(samples, steps)[0]
    kept = torch.nonzero(keep.cpu()).squeeze(1)
    for inner in range(t.num_inner_epochs):
        if inner == 0:  # the global plan: the same samples and steps per optimiser step at any world size
            plan = UpdatePlan(kept, batch.shard.steps[kept])
        else:
            plan = plan_update(kept, s.schedule.num_steps, t.timestep_fraction,
                               generator(s.config.run.seed, "plan", epoch, inner, s.engine.rank),
                               tuple(t.timestep_range))
        plan.order, plan.steps = plan.order.to(s.device), plan.steps.to(s.device)
        yield from policy_update(s.engine, policy_fn, ref_fn, trajectories.log_probs, advantages, plan,
                                 batch_size=t.batch_size, samples_per_step=t.samples_per_step // s.engine.world_size,
                                 loss=LossSettings(t.clip_range, t.kl_coef, t.ops_backend,
                                                   skip_nonfinite=t.on_nonfinite == "skip",
                                                   clip_range_high=t.clip_range_high))


def _mean_where(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None


def run_epoch(s: Session, epoch: int, global_step: int, writer) -> tuple[dict, int]:
    """One epoch end to end; writes its step lines, returns (epoch record, global step)."""
    t0 = time.perf_counter()
    batch = epoch_batch(s, epoch)
    sample_ids = batch.shard.order.to(s.device)                                               # (M,) global ids
    s.unet.eval()
    trajectories = sample_trajectories(s.unet, s.models.vae, s.schedule, batch.prompt_embeds, s.uncond_embed,
                                       batch.sample_prompt[sample_ids], batch.shard.order, s.guidance, s.rollout,
                                       epoch)
    _sync(s.device)
    t1 = time.perf_counter()
    local_rewards = s.reward(trajectories.images, batch.prompts, trajectories.prompt_index)
    rewards = gather_rewards(s, sample_ids, local_rewards, batch.sample_prompt.shape[0])        # (N,)
    if not bool(torch.isfinite(rewards).all()):
        raise NonFiniteError(f"{int((~torch.isfinite(rewards)).sum())} of {rewards.shape[0]} rewards are not finite "
                             "(check the reward model and the images)")
    _sync(s.device)
    t2 = time.perf_counter()
    t = s.config.train
    advantages, keep = epoch_advantages(rewards, s.config.sample.group_size, std=t.adv_std, clip=t.adv_clip_max,
                                        drop_zero_std=t.drop_zero_std_groups, backend=t.ops_backend)
    if t.safe_advantages == "zero":  # safe groups carry no safety signal: only the KL penalty (if any) moves them
        advantages = advantages.masked_fill(~batch.is_unsafe, 0.0)
    for stats in update_epoch(s, epoch, trajectories, batch, advantages[sample_ids], keep[sample_ids]):
        global_step += 1
        writer.log({"epoch": epoch, "step": global_step, **stats}, kind="train")
    _sync(s.device)
    t3 = time.perf_counter()
    record = {"epoch": epoch, "step": global_step, "reward_mean": float(rewards.mean()),
              "reward_std": float(rewards.std()), "reward_mean_safe": _mean_where(rewards, ~batch.is_unsafe),
              "reward_mean_unsafe": _mean_where(rewards, batch.is_unsafe), "num_samples": int(rewards.shape[0]),
              "num_trained_samples": int(keep.sum()), "rollout_s": t1 - t0, "reward_s": t2 - t1, "train_s": t3 - t2,
              **group_kind_stats(rewards, advantages, batch.is_unsafe, s.config.sample.group_size)}
    if s.judge is not None:  # toy world: the pixel judge's verdicts on this rank's samples
        prompts = [batch.prompts[i] for i in batch.sample_prompt[sample_ids].tolist()]
        record.update(s.judge(trajectories.images, prompts, batch.is_unsafe[sample_ids]))
    writer.log(record, kind="epoch")
    if s.config.run.num_sample_images and s.engine.is_main:
        order = sample_ids.argsort()[:s.config.run.num_sample_images]   # this rank's samples, by global id
        save_image_grid(trajectories.images[order], s.output_dir / "samples" / f"epoch_{epoch:04d}.png")
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


def train(config: Config) -> Path:
    """Run (or resume) training as configured; returns the output directory."""
    run = config.run
    with claim_run_dir(run.output_dir, resume=run.resume, overwrite=run.overwrite,
                       main_process=os.environ.get("RANK", "0") == "0"):
        try:
            return _train(config)
        except KeyboardInterrupt:
            saved = list_checkpoints(run.output_dir)
            raise TrainingInterrupted(f"the newest checkpoint is {saved[-1][1]} (resume with run.resume=latest)"
                                      if saved else "no checkpoint had been saved yet") from None


def _train(config: Config) -> Path:
    session, start_epoch, global_step = prepare(config)
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


def run_from_config(config: Config) -> int:
    output_dir = train(config)
    print(f"fastgrpo: done; outputs in {output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`deepspeed fastgrpo/train.py [--config ...] [key=value ...]`: the same as `fastgrpo train`."""
    import argparse

    from fastgrpo.commandline import add_train_arguments, config_from_args, run_command

    parser = argparse.ArgumentParser(prog="fastgrpo/train.py", description="GRPO safety post-training (one rank).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: run_from_config(config_from_args(args)))


if __name__ == "__main__":
    raise SystemExit(main())
