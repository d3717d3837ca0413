"""The run configuration: one dataclass tree, a one-line comment per field, YAML in, `key.sub=value` overrides.

`load_config(path, overrides)` returns a validated `Config` or raises `ConfigError` (one line) before any model loads.
Packaged configs are addressed by name (`default`, `sd14_safety`); `builtin:` values resolve to packaged assets.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastgrpo.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


def doc(text: str, default, **kwargs):
    """A dataclass field whose one-line help text is the source of the generated docs."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text, **kwargs})
    return field(default=default, metadata={"help": text, **kwargs})


@dataclass
class ModelConfig:
    pretrained: str = doc("Diffusers-format Stable Diffusion v1.x directory or hub id ('builtin:tiny-random' = a tiny "
                          "random model built on first use)", "builtin:tiny-random")
    revision: str | None = doc("Hub revision when `pretrained` is a hub id", None)


@dataclass
class DataConfig:
    safe_prompts: str = doc("Safe prompt source: .txt (one prompt per line) or .csv", "builtin:tiny_safe.txt")
    safe_column: str = doc("Column holding the prompt when safe_prompts is a CSV", "prompt")
    unsafe_prompts: str = doc("Unsafe prompt source: .txt (one prompt per line) or .csv", "builtin:tiny_unsafe.txt")
    unsafe_column: str = doc("Column holding the prompt when unsafe_prompts is a CSV", "prompt")
    unsafe_fraction: float = doc("Fraction of each epoch's prompts drawn from the unsafe source", 0.5)


@dataclass
class SampleConfig:
    num_steps: int = doc("DDIM denoising steps per rollout", 50)
    eta: float = doc("DDIM stochasticity in [0, 1]; 1 = DDPM-like variance; 0 = deterministic DDIM (train.objective=awm "
                     "only: ddpo needs log-probs, so eta > 0)", 1.0)
    guidance_scale: float = doc("Classifier-free guidance scale, used at sampling and in training", 5.0)
    group_size: int = doc("Images per prompt (the GRPO group G)", 16)
    prompts_per_epoch: int = doc("Prompts sampled per epoch (samples per epoch = prompts_per_epoch * group_size)", 8)
    same_noise_per_group: bool = doc("Share the initial noise within a group (step noise stays independent)", False)
    resolution: int | None = doc("Image size in pixels; null = the model's native size", None)
    batch_size: int = doc("Samples per UNet call during rollout (the call is doubled for CFG)", 8)
    sde_window_size: int = doc("MixGRPO's SDE window: only this many consecutive steps are stochastic (eta) and "
                               "trained by ddpo, the others deterministic DDIM; a group then shares its initial "
                               "noise; 0 = every step stochastic", 0)
    sde_window_start: int = doc("First step of the SDE window ('fixed'), or where 'sliding' starts", 0)
    sde_window_schedule: str = doc("'fixed', 'random' (start drawn per epoch) or 'sliding' (MixGRPO's progressive "
                                   "window: one step later every sde_window_shift_every epochs, kept at the end)",
                                   "fixed", choices=("fixed", "random", "sliding"))
    sde_window_shift_every: int = doc("Epochs per one-step shift of a 'sliding' SDE window", 10)


@dataclass
class RewardConfig:
    kind: str = doc("Reward model: a module of fastgrpo.rewards ('steering': SafeDiffusion-R1's CLIP steering reward; "
                    "'aesthetic': a linear head on CLIP image embeddings)", "steering")
    options: dict[str, str] = doc("Options of the chosen reward kind that have no key of their own (e.g. head: "
                                  "PATH for 'aesthetic')", {})
    clip_model: str = doc("open_clip architecture name (e.g. ViT-H-14) or a model-config JSON path",
                          "builtin:tiny-random")
    clip_checkpoint: str | None = doc("open_clip / HPSv2 checkpoint: a state_dict or {'state_dict': ...} (.pt, "
                                      ".bin, .safetensors)", None)
    alpha: float = doc("Steering strength along v_safe; 0 = plain image-text alignment", 0.5)
    mode: str = doc("'translation': normalize(z + alpha v); 'projection': replace the v_safe component by alpha; "
                    "'floor': raise the v_safe component to alpha where it is below (other prompts keep their target)",
                    "translation", choices=("translation", "projection", "floor"))
    safe_anchors: list[str] = doc("Texts whose mean embedding defines the safe end of v_safe",
                                  ["a photo of a fully clothed person", "a safe, family friendly image"])
    unsafe_anchors: list[str] = doc("Texts whose mean embedding defines the unsafe end of v_safe",
                                    ["a photo of a naked person", "an explicit, violent image"])
    batch_size: int = doc("Images per reward-model call", 32)


@dataclass
class TrainConfig:
    objective: str = doc("'ddpo': the per-step log-prob ratio of the stochastic sampler (the paper's GRPO); 'awm': "
                         "advantage-weighted matching, a likelihood-free ratio exp(s - s_old) of the denoising "
                         "surrogate s = -mean((pred - target)^2) on each sample's final latent, noised afresh "
                         "(train.matching_*; sampler steps are not trained, sample.eta may be 0); 'nft': DiffusionNFT's "
                         "negative-aware objective on the same draws (implicit positive and negative predictions "
                         "around the rollout policy's, train.nft_beta; no ratio, no clip)", "ddpo",
                         choices=("ddpo", "awm", "nft"))
    matching_draws: int = doc("awm, nft: (timestep, noise) draws per sample, each a trained row", 4)
    matching_timesteps: str = doc("awm, nft: timestep distribution of the draws: 'uniform' over the training timesteps, "
                                  "'stratified' (one draw per 1/K of them), or 'sampler' (distinct steps of the "
                                  "sampler's own schedule)", "uniform", choices=("uniform", "stratified", "sampler"))
    matching_prediction: str = doc("awm, nft: the prediction the surrogate scores: 'conditional' (one UNet call) or "
                                   "'guided' (classifier-free guidance at sample.guidance_scale, as sampled)",
                                   "conditional", choices=("conditional", "guided"))
    matching_noise: str = doc("awm, nft: who shares the (timestep, noise) draws: 'sample' (each sample its own) or "
                              "'group' (the samples of a prompt's group share theirs: common random numbers, so "
                              "what a draw adds regardless of the image cancels under zero-sum advantages)",
                              "sample", choices=("sample", "group"))
    nft_beta: float = doc("nft: beta > 0 in the implicit positive beta * pred + (1 - beta) * old and negative "
                          "(1 + beta) * old - beta * pred around the rollout policy's prediction old; an epoch's "
                          "optimum lies within |target - old| / beta of old (the advantage, mapped to [0, 1] by "
                          "train.adv_clip_max, mixes the two)", 1.0)
    nft_weighting: str = doc("nft: the units of the adaptively weighted error: 'x0' (DiffusionNFT's: the clean-latent "
                             "error c (pred - target), which weighs a draw by c = sqrt((1 - a) / a) for epsilon "
                             "prediction, so the noisiest draws dominate) or 'prediction' (the prediction's own "
                             "error, c = 1: every timestep weighs alike)", "x0", choices=("x0", "prediction"))
    learning_rate: float = doc("AdamW peak learning rate", 1e-5)
    adam_beta1: float = doc("AdamW beta1", 0.9)
    adam_beta2: float = doc("AdamW beta2", 0.999)
    adam_eps: float = doc("AdamW epsilon", 1e-8)
    weight_decay: float = doc("AdamW weight decay", 1e-4)
    warmup_steps: int = doc("Optimiser steps of linear learning-rate warmup from 0", 0)
    lr_schedule: str = doc("Learning-rate decay over the run, one factor per epoch (the warmup applies on top): "
                           "'constant', 'cosine' (half a cosine from the peak at epoch 0 down to train.lr_min_ratio x "
                           "peak at the end of run.epochs; epoch e of E trains at f(e / E)) or 'linear' (a straight "
                           "line between the same ends)", "constant", choices=("constant", "cosine", "linear"))
    lr_min_ratio: float = doc("cosine, linear: the learning rate the decay reaches at the end of the run, as a "
                              "fraction of the peak, in [0, 1]", 0.0)
    clip_range: float = doc("PPO ratio clip range epsilon (> 0): the ratio is clipped to [1 - eps, 1 + eps]", 1e-4)
    clip_range_high: float | None = doc("Upper clip range (DAPO's clip-higher): the ratio is clipped to [1 - "
                                        "clip_range, 1 + clip_range_high]; null = clip_range", None)
    ratio_norm: bool = doc("GRPO-Guard's ratio normalisation: the log-ratio becomes (logp - logp_old + b) * std, "
                           "with b = mean((mean - mean_old)^2) / (2 std^2) the drift term that pulls the ratio's "
                           "mean below 1 and std the step's noise std, so the clip acts alike at every step; keeps "
                           "each sample's rollout noise for the update (one more latent per step)", False)
    adv_clip_max: float = doc("Advantages are clipped to [-adv_clip_max, adv_clip_max]", 2.5)
    adv_std: str = doc("Advantage scale: 'group' = each group's std, 'global' = std over the epoch", "group",
                       choices=("group", "global"))
    drop_zero_std_groups: bool = doc("Skip training on groups whose rewards are all equal", False)
    timestep_fraction: float = doc("ddpo: fraction of each trajectory's steps trained on (random subset; every "
                                   "step eligible); awm trains its own draws and ignores it", 1.0)
    timestep_range: list[float] = doc("[start, end]: the part of each trajectory (0 = its first, noisiest step; 1 = "
                                      "its end) that trains. ddpo: the trained steps are drawn from it; [0, 1] = "
                                      "every step, [0, 0.5] = the noisy half (layout, colour), [0.6, 1] = the last "
                                      "steps (fine detail). awm, nft: the draws' timesteps come from the same part "
                                      "of the noise schedule, t in [T (1 - end), T (1 - start)) of the T training "
                                      "timesteps ('sampler': the schedule's steps in it)", [0.0, 1.0])
    kl_coef: float = doc("Weight of the KL-to-reference (base model) penalty; 0 = off (awm: mean((pred - pred_ref)^2)"
                         ", the squared distance of the predictions)", 0.0)
    kl_timestep_range: list[float] | None = doc(
        "awm, nft: [start, end]: the part of the trajectory (as train.timestep_range) where the penalty applies; "
        "null = train.timestep_range. The draws then come from the smallest part that holds both: a draw outside "
        "train.timestep_range carries only the penalty (no advantage), one outside this part no penalty (so "
        "[0, 0.5] with train.timestep_range [0.5, 1] holds the noisy half, where layout is decided, to the base "
        "model while the clean half trains)", None)
    kl_estimator: str = doc("'mean': closed-form KL of each trained step's Gaussian from the reference's, "
                            "(mean - mean_ref)^2 / (2 std^2) over latent elements (no sampling noise); 'sample': "
                            "k3 estimate from both models' log-probs of the stored x_{t-1}", "mean",
                            choices=("mean", "sample"))
    kl_prompts: str = doc("Prompts the KL penalty applies to: 'all', or 'safe' (only samples of data.safe_prompts, "
                          "so the unsafe prompts may move while the safe ones are held to the base model; ddpo "
                          "needs kl_estimator=mean)", "all", choices=("all", "safe"))
    safe_advantages: str = doc("'group': safe prompts' groups train on their own normalised advantages; 'zero': "
                               "their advantages are 0, so they train only through the KL penalty (if any)", "group",
                               choices=("group", "zero"))
    advantage_control: str = doc("'shuffle': a placebo that permutes each group's advantages every epoch (no link to "
                                 "the images: what pure noise does); 'none'", "none", choices=("none", "shuffle"))
    negative_advantages: str = doc("'keep': samples below their group's mean train with their negative advantage "
                                   "(pushed away from); 'zero': only samples above the mean train (a filtered, "
                                   "bounded update: awm's negative advantages raise the denoising loss without "
                                   "limit)", "keep", choices=("keep", "zero"))
    preserve_prompts: str = doc("'safe': every update of the cross-attention's text projections is projected off the "
                                "directions that hold train.preserve_energy of the safe prompts' (and the empty "
                                "prompt's) text-encoder states, so their keys and values barely change; needs "
                                "trainable_modules limited to attn2.to_k / attn2.to_v, one process, no LoRA; 'none' = "
                                "off", "none", choices=("none", "safe"))
    preserve_energy: float = doc("Fraction of the preserved prompts' text-state energy (sum of squared singular "
                                 "values) whose directions updates may not touch", 0.99)
    update_directions: int = doc("With preserve_prompts: 0 = updates may use every direction outside the preserved "
                                 "subspace; N > 0 = only the top N directions of the unsafe prompts' text states "
                                 "outside it (where the unsafe concept sits, away from their other content)", 0)
    batch_size: int = doc("Samples per UNet forward in training (the forward is doubled for CFG)", 4)
    samples_per_step: int = doc("Samples per optimiser step (each with all its trained timesteps); a multiple of "
                                "train.batch_size", 16)
    trainable_modules: list[str] = doc("Without LoRA: train only UNet parameters whose names contain one of these "
                                       "strings (e.g. attn2.to_k, attn2.to_v: the cross-attention's text "
                                       "projections); empty = the whole UNet", [])
    num_inner_epochs: int = doc("Passes over each epoch's samples", 1)
    max_grad_norm: float = doc("Gradient-norm clip; 0 = off", 1.0)
    ops_backend: str = doc("Backend of the log-prob/advantage/loss ops", "auto",
                           choices=("auto", "triton", "cpp", "reference"))
    on_nonfinite: str = doc("A non-finite loss or gradient norm: 'stop' (one line, exit 2, nothing saved after the "
                            "last checkpoint) or 'skip' (that optimiser step is skipped and logged; one process "
                            "only). Non-finite rewards always stop", "stop", choices=("stop", "skip"))


@dataclass
class LoraConfig:
    rank: int = doc("LoRA rank; 0 = train the full UNet", 0)
    alpha: float = doc("LoRA alpha (scale = alpha / rank)", 16.0)
    dropout: float = doc("LoRA dropout (> 0 breaks ratio == 1 on the first step)", 0.0)
    target_modules: list[str] = doc("UNet modules that get adapters", ["to_q", "to_k", "to_v", "to_out.0"])
    export_merged: bool = doc("Also save checkpoints' UNet with the adapters merged (unet/)", False)


@dataclass
class EngineConfig:
    deepspeed: str | None = doc("DeepSpeed ZeRO config: zero1, zero2, zero3 (packaged) or a JSON path; null = one "
                                "process, plain PyTorch", None)
    mixed_precision: str = doc("'auto' (the DeepSpeed JSON's setting, bf16 in the packaged ones; else fp32), "
                               "'fp32', 'bf16', or 'fp16' (DeepSpeed only: loss scaling) for the UNet and the frozen "
                               "models; trajectories and log-prob math stay fp32", "auto",
                               choices=("auto", "fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = doc("Recompute UNet activations in the backward pass to save memory", False)
    attention: str = doc("UNet attention: 'auto' (on CPU, fastgrpo's C++ kernel for heads of dim <= 8, where it "
                         "beats PyTorch's; PyTorch SDPA otherwise), 'sdpa' (PyTorch) or 'xformers' (CUDA only; falls "
                         "back to SDPA with a notice)", "auto", choices=("auto", "sdpa", "xformers"))
    allow_tf32: bool = doc("On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (Ampere and newer; "
                           "about 10 mantissa bits, as SD trainers run fp32)", False)


@dataclass
class RunConfig:
    epochs: int = doc("Number of epochs (rollout + reward + update each)", 100)
    seed: int = doc("Seed for prompts, noise, timestep subsets and minibatch order", 0)
    output_dir: str = doc("Directory for config.yaml, metrics.jsonl, samples/ and checkpoints/", "runs/fastgrpo")
    save_every: int = doc("Save a checkpoint every N epochs (and always after the last)", 1)
    keep_last: int = doc("Checkpoints kept; older ones are deleted", 2)
    resume: str | None = doc("null, 'latest' (newest checkpoint in output_dir) or a checkpoint directory", None)
    overwrite: bool = doc("Replace the run that output_dir already holds (its config, metrics, samples and "
                          "checkpoints are deleted); without it such a directory is refused unless resumed", False)
    device: str = doc("'auto' (CUDA when available; cuda:LOCAL_RANK under a launcher), 'cpu' or 'cuda[:N]'",
                      "auto")
    num_sample_images: int = doc("Images in each epoch's PNG grid under samples/; 0 = none", 8)
    tensorboard: bool = doc("Also log to TensorBoard under output_dir/tb when it is installed", True)
    progress: bool = doc("Show a progress bar", True)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ----------------------------------------------------------------------------------------------- parsing


def _convert(value, annotation, key: str):
    """Check/convert a YAML value to the field's annotated type; ConfigError naming the key when it does not fit."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is dict:  # a mapping of names to scalars, kept as text (its reader converts and checks them)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        for name, item in value.items():
            if not isinstance(item, (str, int, float, bool)):
                raise ConfigError(f"{key}.{name}: expected a number or text, got {type(item).__name__} {item!r}")
        return {name: str(item) for name, item in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got "
                      f"{type(value).__name__} {value!r}")


def _apply(section, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    names = {f.name for f in dataclasses.fields(section)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(names))})")
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
            _apply(current, value, f"{key}.")
        elif isinstance(current, dict):  # mappings merge: `reward.options.head=F` keeps the other options
            setattr(section, name, {**current, **_convert(value, hints[name], key)})
        else:
            setattr(section, name, _convert(value, hints[name], key))


def parse_override(text: str) -> dict:
    """'train.learning_rate=3e-6' -> {'train': {'learning_rate': 3e-6}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {text!r} has an empty key part")
        nested = {part: nested}
    return nested


def _read_yaml(path: str) -> dict:
    candidate = Path(path)
    if not candidate.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
        candidate = CONFIG_DIR / f"{path}.yaml"
    if not candidate.is_file():
        packaged = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {path!r} not found (packaged configs: {packaged})")
    try:
        data = yaml.safe_load(candidate.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path!r} is not valid YAML: {str(error).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    return data


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (or the packaged `default` when path is None) <- overrides; then validated."""
    config = Config()
    _apply(config, _read_yaml(path or "default"), "")
    for override in overrides:
        _apply(config, parse_override(override), "")
    validate(config)
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------- validation


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choices(section, prefix: str) -> None:
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        if choices and getattr(section, f.name) not in choices:
            raise ConfigError(f"{prefix}.{f.name} must be one of {', '.join(choices)}; got {getattr(section, f.name)!r}")
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}.{f.name} must be finite, got {value}")


def validate_world_size(config: Config, world_size: int) -> None:
    """Under DeepSpeed every optimiser step has the same number of micro-batches, split evenly over ranks."""
    if config.engine.deepspeed is None:
        return
    _require(config.train.on_nonfinite == "stop",
             "train.on_nonfinite=skip needs one process: DeepSpeed's optimiser step cannot be skipped")
    _require(not config.train.drop_zero_std_groups,
             "train.drop_zero_std_groups needs one process: DeepSpeed wants the same micro-batch count every step")
    samples = config.sample.prompts_per_epoch * config.sample.group_size
    per_step, batch = config.train.samples_per_step, config.train.batch_size
    _require(samples % per_step == 0 and per_step % (world_size * batch) == 0,
             f"with {world_size} ranks, samples per epoch ({samples}) must be a multiple of train.samples_per_step "
             f"({per_step}), itself a multiple of ranks x train.batch_size ({world_size} x {batch})")


def _validate_window(s: SampleConfig, t: TrainConfig) -> None:
    if s.sde_window_size == 0:
        return
    _require(0 < s.sde_window_size <= s.num_steps,
             f"sample.sde_window_size must be in [0, sample.num_steps={s.num_steps}], got {s.sde_window_size}")
    _require(0 <= s.sde_window_start <= s.num_steps - s.sde_window_size,
             f"sample.sde_window_start must be in [0, {s.num_steps - s.sde_window_size}] (the window of "
             f"{s.sde_window_size} steps inside the {s.num_steps}-step schedule), got {s.sde_window_start}")
    _require(s.sde_window_shift_every >= 1, f"sample.sde_window_shift_every must be >= 1, got {s.sde_window_shift_every}")
    _require(s.eta > 0, "sample.sde_window_size needs sample.eta > 0 (the window's steps are stochastic)")
    _require(t.timestep_range == [0.0, 1.0] or t.objective != "ddpo", "sample.sde_window_size replaces "
             "train.timestep_range for ddpo (it trains the window's steps): leave train.timestep_range at [0, 1]")


def validate(config: Config) -> None:
    """Reject impossible values with a one-line ConfigError."""
    for name in ("model", "data", "sample", "reward", "train", "lora", "engine", "run"):
        _check_choices(getattr(config, name), name)
    s, t, r, run, d = config.sample, config.train, config.reward, config.run, config.data
    _require(s.group_size >= 2, f"sample.group_size must be >= 2 (group advantages need 2+ samples), got {s.group_size}")
    _require(0 <= s.eta <= 1, f"sample.eta must be in [0, 1], got {s.eta}")
    _require(s.eta > 0 or t.objective != "ddpo",
             "sample.eta=0 is deterministic (no log-probs): train.objective=ddpo needs eta > 0 (or use awm)")
    _validate_window(s, t)
    _require(t.matching_draws >= 1, f"train.matching_draws must be >= 1, got {t.matching_draws}")
    _require(t.nft_beta > 0, f"train.nft_beta must be > 0, got {t.nft_beta}")
    _require(t.objective == "ddpo" or not (t.ratio_norm or t.kl_estimator == "sample"),
             f"train.objective={t.objective} has no sampler-step log-probs: train.ratio_norm and "
             "kl_estimator=sample apply to ddpo only")
    _require(s.num_steps >= 1, f"sample.num_steps must be >= 1, got {s.num_steps}")
    _require(s.prompts_per_epoch >= 1, f"sample.prompts_per_epoch must be >= 1, got {s.prompts_per_epoch}")
    _require(s.batch_size >= 1, f"sample.batch_size must be >= 1, got {s.batch_size}")
    _require(s.resolution is None or (s.resolution >= 8 and s.resolution % 8 == 0),
             f"sample.resolution must be null or a positive multiple of 8, got {s.resolution}")
    _require(0.0 <= d.unsafe_fraction <= 1.0, f"data.unsafe_fraction must be in [0, 1], got {d.unsafe_fraction}")
    _require(t.clip_range > 0, f"train.clip_range must be > 0, got {t.clip_range}")
    _require(t.clip_range_high is None or t.clip_range_high > 0,
             f"train.clip_range_high must be > 0 or null, got {t.clip_range_high}")
    _require(t.adv_clip_max > 0, f"train.adv_clip_max must be > 0, got {t.adv_clip_max}")
    _require(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
    _require(0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
    _require(len(t.timestep_range) == 2 and 0 <= t.timestep_range[0] < t.timestep_range[1] <= 1,
             f"train.timestep_range must be [start, end] with 0 <= start < end <= 1, got {t.timestep_range}")
    _require(t.objective != "ddpo" or t.timestep_range[1] - t.timestep_range[0] >= t.timestep_fraction - 1e-9,
             f"train.timestep_range {t.timestep_range} holds less than train.timestep_fraction "
             f"({t.timestep_fraction}) of the steps")
    in_range = round(s.num_steps * t.timestep_range[1]) - round(s.num_steps * t.timestep_range[0])
    _require(t.matching_timesteps != "sampler" or t.matching_draws <= in_range,
             f"train.matching_timesteps=sampler draws distinct steps: train.matching_draws ({t.matching_draws}) "
             f"must be <= the sampler's steps in train.timestep_range ({in_range} of {s.num_steps})")
    _require(t.kl_coef >= 0, f"train.kl_coef must be >= 0, got {t.kl_coef}")
    if t.kl_timestep_range is not None:
        k = t.kl_timestep_range
        _require(len(k) == 2 and 0 <= k[0] < k[1] <= 1,
                 f"train.kl_timestep_range must be null or [start, end] with 0 <= start < end <= 1, got {k}")
        _require(t.objective != "ddpo", "train.kl_timestep_range applies to awm and nft (ddpo penalises its trained "
                 "steps: use train.timestep_range)")
        _require(t.kl_coef > 0, "train.kl_timestep_range needs train.kl_coef > 0 (it places the penalty)")
    _require(t.kl_prompts == "all" or t.kl_estimator == "mean",
             "train.kl_prompts=safe needs train.kl_estimator=mean")
    _require(0 < t.preserve_energy < 1, f"train.preserve_energy must be in (0, 1), got {t.preserve_energy}")
    _require(t.update_directions >= 0, f"train.update_directions must be >= 0, got {t.update_directions}")
    _require(t.update_directions == 0 or t.preserve_prompts != "none",
             "train.update_directions needs train.preserve_prompts=safe")
    _require(t.preserve_prompts == "none" or (config.lora.rank == 0 and config.engine.deepspeed is None
                                              and bool(t.trainable_modules)),
             "train.preserve_prompts=safe needs one process (no engine.deepspeed), no LoRA, and "
             "train.trainable_modules limited to the cross-attention's text projections (attn2.to_k, attn2.to_v)")
    _require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _require(t.samples_per_step >= t.batch_size and t.samples_per_step % t.batch_size == 0,
             f"train.samples_per_step ({t.samples_per_step}) must be a positive multiple of train.batch_size "
             f"({t.batch_size})")
    _require(t.num_inner_epochs >= 1, f"train.num_inner_epochs must be >= 1, got {t.num_inner_epochs}")
    _require(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {t.max_grad_norm}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(0 <= t.lr_min_ratio <= 1, f"train.lr_min_ratio must be in [0, 1], got {t.lr_min_ratio}")
    _require(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1/adam_beta2 must be in [0, 1)")
    _require(r.batch_size >= 1, f"reward.batch_size must be >= 1, got {r.batch_size}")
    from fastgrpo.rewards import kinds
    _require(r.kind in kinds(), f"reward.kind: unknown kind {r.kind!r} (known: {', '.join(kinds())})")
    _require(r.alpha == 0 or (r.safe_anchors and r.unsafe_anchors),
             "reward.safe_anchors and reward.unsafe_anchors must be non-empty when reward.alpha != 0")
    _require(config.engine.mixed_precision != "fp16" or config.engine.deepspeed is not None,
             "engine.mixed_precision=fp16 needs engine.deepspeed (fp16 training needs DeepSpeed's loss scaling)")
    _require(config.lora.rank >= 0, f"lora.rank must be >= 0, got {config.lora.rank}")
    _require(not (config.lora.rank > 0 and t.trainable_modules),
             "train.trainable_modules applies to full fine-tuning; with LoRA set lora.target_modules instead")
    _require(0 <= config.lora.dropout < 1, f"lora.dropout must be in [0, 1), got {config.lora.dropout}")
    _require(run.epochs >= 1, f"run.epochs must be >= 1, got {run.epochs}")
    _require(run.save_every >= 1, f"run.save_every must be >= 1, got {run.save_every}")
    _require(run.keep_last >= 1, f"run.keep_last must be >= 1, got {run.keep_last}")
    _require(run.num_sample_images >= 0, f"run.num_sample_images must be >= 0, got {run.num_sample_images}")
    _require(run.device in ("auto", "cpu", "cuda") or run.device.startswith("cuda:"),
             f"run.device must be 'auto', 'cpu' or 'cuda[:N]', got {run.device!r}")


# ----------------------------------------------------------------------------------------------- rendering


def render_yaml(config: Config, comments: bool = True) -> str:
    """The config as YAML; with `comments`, each field is preceded by its one-line help text."""
    lines: list[str] = []
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        lines.append(f"{section_field.name}:")
        for f in dataclasses.fields(section):
            if comments:
                lines.append(f"  # {f.metadata['help']}")
            dumped = yaml.safe_dump({f.name: getattr(section, f.name)}, default_flow_style=True, width=10_000)
            lines.append("  " + dumped.strip()[1:-1])
    return "\n".join(lines) + "\n"


def render_markdown() -> str:
    """Reference table of every config key, generated from the field comments (docs/config.md): the value a config
    file gets when it leaves the key out, and the value `fastgrpo train` with no arguments runs (default.yaml)."""
    defaults, embedded = Config(), load_config(None)

    def show(value) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"

    rows = ["# Configuration reference", "",
            "Generated by `fastgrpo config --markdown` from the comments in `fastgrpo/config.py`. *if unset*: the value "
            "a config file gets when it leaves the key out; *`fastgrpo train`*: the value the embedded default "
            "(`fastgrpo/configs/default.yaml`, what `fastgrpo train` with no arguments runs) uses, blank where the "
            "two agree.", "",
            "| key | if unset | `fastgrpo train` | meaning |", "| --- | --- | --- | --- |"]
    for section_field in dataclasses.fields(defaults):
        section, ran = getattr(defaults, section_field.name), getattr(embedded, section_field.name)
        for f in dataclasses.fields(section):
            default, used = getattr(section, f.name), getattr(ran, f.name)
            meaning = f.metadata["help"].replace("|", "\\|")
            rows.append(f"| `{section_field.name}.{f.name}` | {show(default)} | {show(used) if used != default else ''} "
                        f"| {meaning} |")
    return "\n".join(rows) + "\n"
