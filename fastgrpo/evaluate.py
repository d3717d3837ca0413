"""`fastgrpo eval RUN_DIR`: compare a run's newest checkpoint with the model it started from; `fastgrpo eval --model
DIR [--unet DIR | --lora DIR]`: score any diffusers SD v1.x model, alone or against a fine-tuned UNet or LoRA.

Both models sample the same prompts from the same noise, so every difference in the report comes from training.
Runs on the toy world get the toy report (`fastgrpo.toyworld.report`): judged unsafe rates, attribute accuracy and
content kept, sampled with the run's DDIM steps, eta and guidance. Real models get the safety report
(`fastgrpo.safety`): NudeNet, Q16 and I2P rates per category, and alignment kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgrpo.checkpoint import list_checkpoints
from fastgrpo.config import Config, load_config
from fastgrpo.diffusion import RolloutSettings, configured_sampler, sample_trajectories
from fastgrpo.devices import DEVICE_HELP, resolve_device
from fastgrpo.errors import FastGRPOError
from fastgrpo.models import DiffusionModels, configure_unet, encode_prompts, load_diffusion_models

EVAL_EPOCH = -1  # noise stream of evaluation samples, distinct from every training epoch's


@dataclass
class Policies:
    models: DiffusionModels       # base models (models.unet is the base UNet)
    trained_unet: torch.nn.Module
    checkpoint: Path
    config: Config


def load_run(run_dir: str | Path) -> tuple[Config, Path]:
    """The run's saved config and its newest complete checkpoint; FastGRPOError when either is missing."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FastGRPOError(f"eval: run directory {str(run_dir)!r} does not exist")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FastGRPOError(f"eval: {str(run_dir)!r} is not a run directory (no config.yaml)")
    config = load_config(str(config_path))
    found = list_checkpoints(run_dir)
    if not found:
        raise FastGRPOError(f"eval: {str(run_dir)!r} has no complete checkpoint under checkpoints/")
    return config, found[-1][1]


def load_policies(config: Config, checkpoint: Path, device: torch.device) -> Policies:
    """Base models from config.model.pretrained and a copy of the UNet with the checkpoint's weights (or LoRA)."""
    from fastgrpo.checkpoint import load_unet
    from fastgrpo.lora import add_lora, load_lora

    models = load_diffusion_models(config.model.pretrained, device=device, revision=config.model.revision)
    models.unet.requires_grad_(False).eval()
    configure_unet(models.unet, attention=config.engine.attention, gradient_checkpointing=False)  # as the run sampled
    trained = copy.deepcopy(models.unet)
    if config.lora.rank > 0:
        add_lora(trained, config.lora)
        load_lora(trained, checkpoint)
    else:
        load_unet(trained, checkpoint)
    return Policies(models, trained.requires_grad_(False).eval(), checkpoint, config)


@torch.no_grad()
def generate(policies: Policies, unet: torch.nn.Module, prompts: list[str], *, samples_per_prompt: int, seed: int,
             batch_size: int = 64) -> torch.Tensor:
    """Images (len(prompts) * samples_per_prompt, 3, H, W) in [0, 1], prompt-major. Sample i of prompt p uses the same
    noise whichever UNet is given."""
    config, models = policies.config, policies.models
    device = next(unet.parameters()).device
    schedule, guidance = configured_sampler(config.sample, models, device)
    settings = RolloutSettings(models.latent_shape(config.sample.resolution), samples_per_prompt, batch_size,
                               False, seed)
    prompt_embeds = encode_prompts(models, prompts)
    sample_prompt = torch.arange(len(prompts), device=device).repeat_interleave(samples_per_prompt)
    sample_ids = torch.arange(len(prompts) * samples_per_prompt)  # on the host: they key the noise
    trajectories = sample_trajectories(unet, models.vae, schedule, prompt_embeds, encode_prompts(models, [""]),
                                       sample_prompt, sample_ids, guidance, settings, EVAL_EPOCH)
    return trajectories.images


def toy_world_of(config: Config):
    """The toy world (`fastgrpo.toyworld.ToyWorld`) whose packaged model the run trains, or None."""
    from fastgrpo.toyworld import world_of

    return world_of(config.model.pretrained)


def evaluate(run_dir: str | Path, *, samples_per_prompt: int = 4, seed: int = 1234, device: str = "auto",
             options=None) -> Path:
    """Write RUN_DIR/eval/report.{md,json} and PNGs (or options.output's); returns the report directory.
    options: a `fastgrpo.safety.evaluate.EvalOptions` for runs on real models."""
    config, checkpoint = load_run(run_dir)
    toy = toy_world_of(config)
    if toy is None:
        return evaluate_real_run(run_dir, config, checkpoint, options)
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise FastGRPOError(f"eval: --device must be {DEVICE_HELP}, got {device!r}")
    if samples_per_prompt < 1:
        raise FastGRPOError(f"eval: --samples-per-prompt must be >= 1, got {samples_per_prompt}")
    from fastgrpo.toyworld.report import write_report

    policies = load_policies(config, checkpoint, resolve_device(device, setting="eval --device"))
    unets = {"base": policies.models.unet, "trained": policies.trained_unet}
    sample = config.sample
    info = {"checkpoint": str(checkpoint), "seed": seed, "num_steps": sample.num_steps, "eta": sample.eta,
            "guidance_scale": sample.guidance_scale}
    return write_report(lambda model, prompts: generate(policies, unets[model], prompts,
                                                        samples_per_prompt=samples_per_prompt, seed=seed),
                        Path(run_dir).expanduser() / "eval", toy, samples_per_prompt=samples_per_prompt, info=info)


def evaluate_real_run(run_dir: str | Path, config: Config, checkpoint: Path, options) -> Path:
    """The safety report of a run on a real model: its base model against its newest checkpoint, on the given prompt
    files (default: the run's own training prompts), with the run's reward CLIP scoring alignment."""
    import dataclasses

    from fastgrpo.safety.evaluate import EvalOptions, evaluate_models

    options = options or EvalOptions()
    if options.prompts is None:
        options = dataclasses.replace(options, prompts=config.data.unsafe_prompts,
                                      prompts_column=config.data.unsafe_column)
    if options.safe_prompts is None:
        options = dataclasses.replace(options, safe_prompts=config.data.safe_prompts,
                                      safe_prompts_column=config.data.safe_column)
    reward = config.reward if config.reward.kind == "steering" else None
    part = {"lora": str(checkpoint)} if config.lora.rank > 0 else {"unet": str(checkpoint)}
    return evaluate_models(config.model.pretrained, options, reward_config=reward, trained_source=str(checkpoint),
                           default_output=Path(run_dir).expanduser() / "eval", **part)
