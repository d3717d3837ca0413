"""End to end on tiny random models: training, metrics, on-policy ratios, checkpoints, resume, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.checkpoint import list_checkpoints
from fastgrpo.config import load_config
from fastgrpo.diffusion import draw_noise
from fastgrpo.grpo import epoch_advantages
from fastgrpo.train import train

from conftest import REPO

pytestmark = pytest.mark.slow

STEP_KEYS = {"epoch", "step", "loss", "approx_kl", "clipfrac", "ratio_mean", "ratio_min", "ratio_max", "grad_norm"}
EPOCH_KEYS = {"epoch", "step", "reward_mean", "reward_std", "reward_mean_safe", "reward_mean_unsafe", "rollout_s",
              "reward_s", "train_s"}


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def unet_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))


def test_two_epochs_train_log_and_checkpoint(tiny_overrides, tiny_pipeline_dir):
    config = load_config("smoke", tiny_overrides + ["run.save_every=1", "run.keep_last=1", "train.timestep_fraction=0.5",
                                                 "run.tensorboard=true"])
    output_dir = train(config)
    records = read_metrics(output_dir)
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "reward_mean" in r]
    memory = [r for r in records if "rank" in r]
    assert len(epochs) == 2 and all(EPOCH_KEYS <= r.keys() for r in epochs)
    assert len(memory) == 1 and memory[0]["rank"] == 0
    # AdamW keeps two fp32 moments per trainable parameter (plus a scalar step count each)
    assert memory[0]["grad_bytes"] == memory[0]["param_bytes"]
    assert memory[0]["optimizer_state_bytes"] == pytest.approx(2 * memory[0]["grad_bytes"], rel=1e-3)
    # 8 samples per epoch, 4 per optimiser step -> 2 steps per epoch
    assert len(steps) == 4 and all(STEP_KEYS <= r.keys() for r in steps)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for first in (steps[0], steps[2]):  # first optimiser step of each epoch is on-policy
        for key in ("ratio_mean", "ratio_min", "ratio_max"):
            assert abs(first[key] - 1.0) <= 1e-5, first
    assert any(abs(r["ratio_max"] - 1) > 1e-6 for r in (steps[1], steps[3]))  # the update changed the policy
    assert (output_dir / "config.yaml").read_text().startswith("model:")
    assert load_config(str(output_dir / "config.yaml")) == config  # the saved config reproduces the run
    assert any((output_dir / "tb").iterdir())
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    kept = list_checkpoints(output_dir)
    assert [epoch for epoch, _ in kept] == [1]  # keep_last=1 removed epoch_0
    # The UNet checkpoint differs from the base and loads into a stock pipeline.
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = unet_weights(kept[0][1])
    assert any(not torch.equal(base[k], trained[k]) for k in base)
    unet = UNet2DConditionModel.from_pretrained(kept[0][1] / "unet")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, unet=unet, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red apple", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (16, 16, 3)


def straight_and_resumed(common: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The run of `common` (3 epochs) straight through, and the same run stopped after 2 epochs and resumed."""
    straight = train(load_config("smoke", common + [f"run.output_dir={tmp_path / 'straight'}"]))
    interrupted = tmp_path / "interrupted"
    train(load_config("smoke", common + [f"run.output_dir={interrupted}", "run.epochs=2"]))
    return straight, train(load_config("smoke", common + [f"run.output_dir={interrupted}", "run.resume=latest"]))


def test_resume_equals_uninterrupted(tiny_overrides, tmp_path):
    common = tiny_overrides + ["run.save_every=1", "run.num_sample_images=0", "train.timestep_fraction=0.5",
                               "run.epochs=3"]
    straight, resumed = straight_and_resumed(common, tmp_path)
    a, b = unet_weights(list_checkpoints(straight)[-1][1]), unet_weights(list_checkpoints(resumed)[-1][1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not bitwise exact"
    # timings differ; the memory lines are the first run's, once
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert strip(read_metrics(straight)) == strip(read_metrics(resumed))
    # resuming from an explicit directory works too
    explicit = list_checkpoints(resumed)[0][1]
    train(load_config("smoke", common + [f"run.output_dir={tmp_path / 'other'}", f"run.resume={explicit}"]))


@pytest.mark.parametrize("schedule, min_ratio", [("cosine", 0.1), ("linear", 0.0)])
def test_lr_schedule_follows_torch_schedulers_and_resumes(tiny_overrides, tmp_path, monkeypatch, schedule,
                                                         min_ratio):
    import fastgrpo.train as train_module
    from fastgrpo.errors import TrainingInterrupted

    common = tiny_overrides + ["run.save_every=1", "run.keep_last=3", "run.num_sample_images=0", "run.epochs=3",
                               "train.warmup_steps=3", f"train.lr_schedule={schedule}", f"train.lr_min_ratio={min_ratio}"]
    straight = train(load_config("smoke", common + [f"run.output_dir={tmp_path / 'straight'}"]))
    # the same 3-epoch run stopped by Ctrl-C after its second epoch's checkpoint, then resumed
    real_run_epoch, calls = train_module.run_epoch, {"n": 0}

    def stopped_at_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", stopped_at_third)
    interrupted = common + [f"run.output_dir={tmp_path / 'interrupted'}"]
    with pytest.raises(TrainingInterrupted):
        train(load_config("smoke", interrupted))
    monkeypatch.setattr(train_module, "run_epoch", real_run_epoch)
    resumed = train(load_config("smoke", interrupted + ["run.resume=latest"]))
    # the reference: torch's own epoch scheduler with the same ends, times the per-step warmup
    peak = load_config("smoke", common).train.learning_rate
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    reference = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3, eta_min=min_ratio * peak)
                 if schedule == "cosine" else
                 torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=min_ratio, total_iters=3))
    epoch_lr = []
    for _ in range(3):
        epoch_lr.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    steps = [r for r in read_metrics(straight) if "loss" in r]
    assert [r["epoch"] for r in steps] == [0, 0, 1, 1, 2, 2]
    for index, record in enumerate(steps):
        expected = epoch_lr[record["epoch"]] * min(1.0, (index + 1) / 3)
        assert record["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), (index, record["lr"], expected)
    assert epoch_lr[0] == peak and epoch_lr[2] < epoch_lr[1] < peak  # it decays (after the 3-step warmup)
    assert steps[-1]["lr"] == pytest.approx(epoch_lr[2]) and steps[-1]["lr"] < 0.9 * peak
    # resumed mid-schedule, the run is the uninterrupted one bit for bit
    a, b = unet_weights(list_checkpoints(straight)[-1][1]), unet_weights(list_checkpoints(resumed)[-1][1])
    assert all(torch.equal(a[k], b[k]) for k in a), "resume is not bitwise exact"
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rs]  # noqa: E731
    assert strip(read_metrics(straight)) == strip(read_metrics(resumed))
    # and the decay changes what is trained: the constant schedule's weights differ after epoch 0
    constant = train(load_config("smoke", common + [f"run.output_dir={tmp_path / 'constant'}",
                                                    "train.lr_schedule=constant"]))
    c = unet_weights(list_checkpoints(constant)[-1][1])
    assert any(not torch.equal(a[k], c[k]) for k in a)
    first = lambda run: unet_weights(dict(list_checkpoints(run))[0])  # noqa: E731  (epoch 0: the same peak)
    assert all(torch.equal(first(straight)[k], first(constant)[k]) for k in a)


def test_interrupted_save_keeps_previous_checkpoint(tiny_overrides, monkeypatch):
    config = load_config("smoke", tiny_overrides + ["run.save_every=1", "run.num_sample_images=0"])
    output_dir = Path(config.run.output_dir)
    import fastgrpo.checkpoint as checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert [epoch for epoch, _ in list_checkpoints(output_dir)] == [0]
    resumed = train(load_config("smoke", tiny_overrides + ["run.save_every=1", "run.resume=latest"]))
    assert [epoch for epoch, _ in list_checkpoints(resumed)] == [0, 1]


@pytest.mark.parametrize("estimator, prompts", [("mean", "all"), ("sample", "all"), ("mean", "safe")])
def test_kl_penalty_inner_epochs_and_warmup(tiny_overrides, estimator, prompts):
    config = load_config("smoke", tiny_overrides + [
        "run.epochs=1", "train.kl_coef=0.1", f"train.kl_estimator={estimator}", f"train.kl_prompts={prompts}",
        "train.num_inner_epochs=2", "train.warmup_steps=3"])
    records = read_metrics(train(config))
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all("kl" in r and r["kl"] >= 0 for r in steps)  # 2 steps per inner epoch, 2 of them
    assert steps[0]["kl"] <= 1e-6 < steps[-1]["kl"]  # the policy starts at the reference and moves away
    assert abs(steps[0]["ratio_max"] - 1) <= 1e-5
    assert [round(r["lr"] / 1e-3, 6) for r in steps] == [round(x, 6) for x in (1 / 3, 2 / 3, 1.0, 1.0)]


def test_groups_with_no_reward_spread_are_not_trained():
    """train.drop_zero_std_groups: a group whose rewards are all equal has zero advantages; it is left out of the
    update (keep False) and only then."""
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.1, 0.5, 0.2, 0.7, 0.7])  # groups of 2: the first and last have no spread
    advantages, keep = epoch_advantages(rewards[:6], 3, std="group", clip=5.0, drop_zero_std=True,
                                        backend="reference")
    assert keep.tolist() == [False] * 3 + [True] * 3 and advantages[:3].abs().max() == 0
    _, keep = epoch_advantages(rewards, 2, std="group", clip=5.0, drop_zero_std=True, backend="reference")
    assert keep.tolist() == [False, False, True, True, True, True, False, False]
    _, keep_all = epoch_advantages(rewards, 2, std="group", clip=5.0, drop_zero_std=False, backend="reference")
    assert keep_all.all()


def test_same_noise_per_group_shares_only_the_initial_latent():
    ids = torch.arange(6)
    shared = draw_noise(0, 1, ids, ids // 3, 2, (4, 2, 2), same_noise_per_group=True, device="cpu")
    own = draw_noise(0, 1, ids, ids // 3, 2, (4, 2, 2), same_noise_per_group=False, device="cpu")
    assert torch.equal(shared[0, 0], shared[2, 0]) and not torch.equal(shared[0, 0], shared[3, 0])
    assert not torch.equal(own[0, 0], own[1, 0])
    assert torch.equal(shared[:, 1:], own[:, 1:])  # the steps' noise stays each sample's own


def run_cli(args, cwd, script=False):
    command = [sys.executable, str(REPO / "fastgrpo" / "train.py")] if script else \
        [sys.executable, "-m", "fastgrpo.cli", "train"]
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(command + ["--config", "smoke", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def test_script_path_runs(tiny_overrides, tmp_path):
    result = run_cli([o for o in tiny_overrides if not o.startswith("run.epochs")] + ["run.epochs=1"], tmp_path,
                     script=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fastgrpo: done" in result.stdout


@pytest.mark.parametrize("override, message", [
    ("model.pretrained={tmp}/missing-model", "does not exist"),
    ("model.pretrained={tmp}", "not a diffusers pipeline directory"),
    ("data.safe_prompts={tmp}/empty.txt", "holds no prompts"),
    ("data.unsafe_prompts={tmp}/missing.txt", "not found"),
    ("run.resume=latest", "no checkpoint"),
    ("reward.clip_checkpoint={tmp}/missing.pt", "does not exist"),
])
def test_cli_user_errors_exit_2_with_one_line(tiny_overrides, tmp_path, override, message):
    (tmp_path / "empty.txt").write_text("\n")
    result = run_cli(tiny_overrides + [override.format(tmp=tmp_path)], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgrpo: error:") and message in lines[0], result.stderr


def test_bf16_mixed_precision_keeps_fp32_trajectories(tiny_overrides):
    """bf16 autocast for the UNet and bf16 frozen models; trajectories and log-prob math stay fp32. The first step's
    ratios are 1 within what bf16 allows (the same bf16 forward at sampling and training)."""
    config = load_config("smoke", tiny_overrides + ["run.epochs=1", "engine.mixed_precision=bf16"])
    records = read_metrics(train(config))
    first = [r for r in records if "loss" in r][0]
    assert abs(first["ratio_max"] - 1) <= 1e-2 and abs(first["ratio_min"] - 1) <= 1e-2, first


def test_xformers_falls_back_to_sdpa_with_a_notice(tiny_pipeline_dir, capsys):
    from fastgrpo.models import configure_unet, load_diffusion_models
    models = load_diffusion_models(str(tiny_pipeline_dir), device=torch.device("cpu"))
    assert configure_unet(models.unet, attention="xformers", gradient_checkpointing=True) == "sdpa"
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "xformers attention unavailable" in notice[0] and "SDPA" in notice[0]
    assert models.unet.is_gradient_checkpointing


def test_safe_only_kl_falls_on_exactly_the_safe_prompts_samples(monkeypatch, tiny_overrides, prompt_files):
    """train.kl_prompts=safe: every trained sample of a safe prompt carries its KL, every unsafe prompt's sample
    none. Samples are stored in the shuffled plan order, so the safe mask must be read in that order too."""
    from fastgrpo import epoch as epoch_module
    from fastgrpo import grpo as grpo_module
    from fastgrpo.objectives import ddpo as ddpo_module
    from fastgrpo.prompts import load_prompts

    unsafe_texts = set(load_prompts(str(prompt_files[1])))
    epoch_texts, rows_seen = {}, []
    real_encode, real_recompute, real_loss_fn = (epoch_module.encode_prompts, ddpo_module.recompute_log_probs,
                                                 grpo_module.ddpo_loss_fn)

    def encode(models, prompts):
        epoch_texts["texts"] = list(prompts)
        return real_encode(models, prompts)

    def recompute(unet, trajectories, prompt_embeds, *args, **kwargs):
        log_probs, kl = real_recompute(unet, trajectories, prompt_embeds, *args, **kwargs)
        samples = args[3]
        unsafe = torch.tensor([epoch_texts["texts"][i] in unsafe_texts
                               for i in trajectories.prompt_index[samples].tolist()])
        return log_probs, (kl if kl is None else torch.where(unsafe, 1.0, 2.0).to(kl))  # marks each row's kind

    def loss_fn(policy_fn, *args, **kwargs):
        def recording(samples, steps):
            log_probs, kl = policy_fn(samples, steps)
            rows_seen.append(kl.detach().clone())
            return log_probs, kl
        return real_loss_fn(recording, *args, **kwargs)

    monkeypatch.setattr(epoch_module, "encode_prompts", encode)
    monkeypatch.setattr(ddpo_module, "recompute_log_probs", recompute)
    monkeypatch.setattr(ddpo_module, "ddpo_loss_fn", loss_fn)
    train(load_config("smoke", tiny_overrides + ["run.epochs=2", "train.kl_coef=0.1", "train.kl_prompts=safe",
                                                 "data.unsafe_fraction=0.5"]))
    values = torch.cat(rows_seen)
    # a safe sample keeps its marker (2), an unsafe one is weighted to 0; never 1 (an unsafe sample's KL kept)
    assert set(values.tolist()) == {0.0, 2.0}
