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
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgrpo.allocator import keep_freed_memory
from fastgrpo.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from fastgrpo.config import Config, config_to_dict, render_yaml
from fastgrpo.diffusion import DDIMSchedule, Guidance, RolloutSettings, recompute_log_probs, sample_trajectories
from fastgrpo.engine import SingleProcessEngine
from fastgrpo.errors import ConfigError
from fastgrpo.grpo import LossSettings, epoch_advantages, plan_update, policy_update
from fastgrpo.metrics import MetricsWriter, save_image_grid
from fastgrpo.models import DiffusionModels, encode_prompts, load_diffusion_models
from fastgrpo.prompts import PromptMixer, load_prompts
from fastgrpo.reward import SteeringReward, load_steering_reward
from fastgrpo.rng import generator


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


@dataclass
class Session:
    """Everything one run holds: built once in `prepare`, used by every epoch."""

    config: Config
    device: torch.device
    models: DiffusionModels
    reward: SteeringReward
    engine: SingleProcessEngine
    ref_unet: torch.nn.Module | None
    mixer: PromptMixer
    schedule: DDIMSchedule
    guidance: Guidance
    rollout: RolloutSettings
    uncond_embed: torch.Tensor  # (1, L, D)
    output_dir: Path


def prepare(config: Config) -> tuple[Session, int, int]:
    """Check inputs (before any model loads), load models, restore a checkpoint. Returns (session, epoch, step)."""
    run, data = config.run, config.data
    output_dir = Path(run.output_dir)
    checkpoint = find_checkpoint(output_dir, run.resume) if run.resume else None
    mixer = PromptMixer(load_prompts(data.safe_prompts, data.safe_column),
                        load_prompts(data.unsafe_prompts, data.unsafe_column),
                        data.unsafe_fraction, config.sample.prompts_per_epoch, run.seed)
    device = resolve_device(run.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(run.seed)
    models = load_diffusion_models(config.model.pretrained, device=device, revision=config.model.revision)
    reward = load_steering_reward(config.reward, device)
    ref_unet = copy.deepcopy(models.unet).requires_grad_(False) if config.train.kl_coef > 0 else None
    engine = SingleProcessEngine(models.unet, config.train)
    start_epoch, global_step = 0, 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, models.unet)
        engine.load_state_dict(state["engine"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
    sample = config.sample
    session = Session(
        config=config, device=device, models=models, reward=reward, engine=engine, ref_unet=ref_unet, mixer=mixer,
        schedule=DDIMSchedule.from_scheduler(models.scheduler, sample.num_steps, device),
        guidance=Guidance(sample.eta, sample.guidance_scale, models.prediction_type, config.train.ops_backend),
        rollout=RolloutSettings(models.latent_shape(sample.resolution), sample.group_size, sample.batch_size,
                                sample.same_noise_per_group, run.seed),
        uncond_embed=encode_prompts(models, [""]), output_dir=output_dir)
    return session, start_epoch, global_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rollout_epoch(s: Session, epoch: int):
    """Prompts, trajectories and rewards of one epoch. Returns (trajectories, prompt_embeds, rewards, is_unsafe)."""
    group = s.config.sample.group_size
    batch = s.mixer.epoch(epoch)
    unique = list(dict.fromkeys(batch.prompts))
    row = {prompt: i for i, prompt in enumerate(unique)}
    prompt_embeds = encode_prompts(s.models, unique)                                          # (U, L, D)
    sample_prompt = torch.tensor([row[p] for p in batch.prompts]).repeat_interleave(group).to(s.device)  # (N,)
    sample_ids = torch.arange(sample_prompt.shape[0], device=s.device)
    s.models.unet.eval()
    trajectories = sample_trajectories(s.models.unet, s.models.vae, s.schedule, prompt_embeds, s.uncond_embed,
                                       sample_prompt, sample_ids, s.guidance, s.rollout, epoch)
    _sync(s.device)
    return trajectories, prompt_embeds, unique, batch.is_unsafe.repeat_interleave(group).to(s.device)


def update_epoch(s: Session, epoch: int, trajectories, prompt_embeds, advantages, keep):
    """The inner epochs of clipped-ratio updates; yields each optimiser step's statistics."""
    t = s.config.train
    s.models.unet.train()

    def log_prob_fn(unet):
        return lambda samples, steps: recompute_log_probs(unet, trajectories, prompt_embeds, s.uncond_embed,
                                                          s.schedule, s.guidance, samples, steps)

    ref_fn = log_prob_fn(s.ref_unet) if s.ref_unet is not None else None
    trained = torch.nonzero(keep.cpu()).squeeze(1)
    for inner in range(t.num_inner_epochs):
        plan = plan_update(trained, s.schedule.num_steps, t.timestep_fraction, generator(s.config.run.seed, "plan",
                                                                                          epoch, inner))
        plan.order, plan.steps = plan.order.to(s.device), plan.steps.to(s.device)
        yield from policy_update(s.engine, log_prob_fn(s.models.unet), ref_fn, trajectories.log_probs, advantages,
                                 plan, batch_size=t.batch_size, samples_per_step=t.samples_per_step,
                                 loss=LossSettings(t.clip_range, t.kl_coef, t.ops_backend))


def _mean_where(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    return float(values[mask].mean()) if bool(mask.any()) else None


def run_epoch(s: Session, epoch: int, global_step: int, writer: MetricsWriter) -> tuple[dict, int]:
    """One epoch end to end; writes its step lines, returns (epoch record, global step)."""
    t0 = time.perf_counter()
    trajectories, prompt_embeds, prompts, is_unsafe = rollout_epoch(s, epoch)
    t1 = time.perf_counter()
    rewards = s.reward(trajectories.images, prompts, trajectories.prompt_index)
    _sync(s.device)
    t2 = time.perf_counter()
    t = s.config.train
    advantages, keep = epoch_advantages(rewards, s.config.sample.group_size, std=t.adv_std, clip=t.adv_clip_max,
                                        drop_zero_std=t.drop_zero_std_groups, backend=t.ops_backend)
    for stats in update_epoch(s, epoch, trajectories, prompt_embeds, advantages, keep):
        global_step += 1
        writer.log({"epoch": epoch, "step": global_step, **stats}, kind="train")
    _sync(s.device)
    t3 = time.perf_counter()
    record = {"epoch": epoch, "step": global_step, "reward_mean": float(rewards.mean()),
              "reward_std": float(rewards.std()), "reward_mean_safe": _mean_where(rewards, ~is_unsafe),
              "reward_mean_unsafe": _mean_where(rewards, is_unsafe), "num_samples": int(rewards.shape[0]),
              "num_trained_samples": int(keep.sum()), "rollout_s": t1 - t0, "reward_s": t2 - t1, "train_s": t3 - t2}
    writer.log(record, kind="epoch")
    count = s.config.run.num_sample_images
    if count:
        group = s.config.sample.group_size
        picks = trajectories.images[::group][:count] if len(prompts) >= count else trajectories.images[:count]
        save_image_grid(picks, s.output_dir / "samples" / f"epoch_{epoch:04d}.png")
    return record, global_step


def train(config: Config) -> Path:
    """Run (or resume) training as configured; returns the output directory."""
    session, start_epoch, global_step = prepare(config)
    output_dir = session.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(render_yaml(config), encoding="utf-8")
    writer = MetricsWriter(output_dir, tensorboard=config.run.tensorboard,
                           resume_epoch=start_epoch if config.run.resume else None)
    from tqdm.auto import tqdm

    progress = tqdm(range(start_epoch, config.run.epochs), initial=start_epoch, total=config.run.epochs,
                    desc="fastgrpo", unit="epoch", disable=not config.run.progress)
    try:
        for epoch in progress:
            record, global_step = run_epoch(session, epoch, global_step, writer)
            progress.set_postfix(reward=f"{record['reward_mean']:.4f}", step=global_step)
            if (epoch + 1) % config.run.save_every == 0 or epoch + 1 == config.run.epochs:
                state = {"global_step": global_step, "engine": session.engine.state_dict(),
                         "config": config_to_dict(config)}
                save_checkpoint(output_dir, epoch, session.models.unet, state, config.run.keep_last)
    finally:
        progress.close()
        writer.close()
    return output_dir


def main(argv: list[str] | None = None) -> int:
    from fastgrpo.cli import main as cli_main
    return cli_main(["train", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
