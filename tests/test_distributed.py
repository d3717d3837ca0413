"""DeepSpeed on CPU: 2 ranks (gloo) against one process; ZeRO-2 and ZeRO-3; resume; memory report.

`deepspeed --num_gpus 2` starts two CPU ranks. These runs take a few seconds each after DeepSpeed's one-time build
of its shared-memory communication op.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.checkpoint import list_checkpoints
from fastgrpo.config import load_config
from fastgrpo.grpo import UpdatePlan, shard_plan
from fastgrpo.train import train

from conftest import REPO

pytestmark = pytest.mark.slow

# 4 prompts x group 4 = 16 samples; 8 per optimiser step -> 2 steps per epoch; 2 ranks x batch 2 divide 8.
SHAPE = ["sample.prompts_per_epoch=4", "train.samples_per_step=8", "train.batch_size=2", "run.num_sample_images=0",
         "engine.mixed_precision=fp32", "run.save_every=1", "run.keep_last=5", "train.timestep_fraction=0.5"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(overrides: list[str], cwd: Path, ranks: int = 2) -> None:
    # the `deepspeed` launcher, run through this interpreter (a console script may not be on PATH yet)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(REPO / "fastgrpo" / "train.py"), "--config", "smoke",
               *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def weights(output_dir: Path, epoch: int) -> dict[str, torch.Tensor]:
    path = dict(list_checkpoints(output_dir))[epoch]
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_shard_plan_splits_every_step_evenly():
    plan = UpdatePlan(torch.randperm(24), torch.arange(48).view(24, 2))
    shards = [shard_plan(plan, rank, 3, samples_per_step=6) for rank in range(3)]
    assert sorted(torch.cat([s.order for s in shards]).tolist()) == list(range(24))
    for step in range(4):  # each optimiser step's 6 samples: 2 from each rank, the same ones as one rank trains
        chunk = set(plan.order[step * 6:(step + 1) * 6].tolist())
        assert chunk == {int(i) for s in shards for i in s.order[step * 2:(step + 1) * 2]}
    assert torch.equal(shards[1].steps, plan.steps[[2, 3, 8, 9, 14, 15, 20, 21]])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline_dir, tiny_clip_files, prompt_files):
    """One single-process run and three 2-rank runs (ZeRO-2 straight, ZeRO-2 resumed, ZeRO-3)."""
    root = tmp_path_factory.mktemp("distributed")
    clip_config, clip_checkpoint = tiny_clip_files
    safe, unsafe = prompt_files
    base = [f"model.pretrained={tiny_pipeline_dir}", f"reward.clip_model={clip_config}",
            f"reward.clip_checkpoint={clip_checkpoint}", f"data.safe_prompts={safe}", f"data.unsafe_prompts={unsafe}",
            "sample.num_steps=4", "sample.group_size=4", "sample.batch_size=4", "train.learning_rate=1e-3",
            "train.clip_range=1e-2", "run.progress=false", "run.tensorboard=false", *SHAPE]
    single = train(load_config("smoke", base + ["run.epochs=2", f"run.output_dir={root / 'single'}"]))
    zero2 = root / "zero2"
    launch(base + ["run.epochs=3", f"run.output_dir={zero2}", "engine.deepspeed=zero2"], root)
    resumed = root / "resumed"
    shutil.copytree(zero2, resumed)
    shutil.rmtree(dict(list_checkpoints(resumed))[2])  # as if stopped after epoch 1
    launch(base + ["run.epochs=3", f"run.output_dir={resumed}", "engine.deepspeed=zero2", "run.resume=latest"], root)
    zero3 = root / "zero3"
    launch(base + ["run.epochs=1", f"run.output_dir={zero3}", "engine.deepspeed=zero3"], root)
    bf16 = root / "bf16"  # the packaged zero2 config as shipped: bf16 weights, fp32 trajectories and log-prob math
    launch([o for o in base if not o.startswith("engine.mixed_precision")] +
           ["run.epochs=1", f"run.output_dir={bf16}", "engine.deepspeed=zero2"], root)
    return {"single": single, "zero2": zero2, "resumed": resumed, "zero3": zero3, "bf16": bf16}


def test_two_ranks_match_one_process(runs):
    single, zero2 = records(runs["single"]), records(runs["zero2"])
    epochs = lambda rs: [r for r in rs if "reward_mean" in r]  # noqa: E731
    steps = lambda rs: [r for r in rs if "loss" in r]  # noqa: E731
    for a, b in zip(epochs(single), epochs(zero2)[:2]):  # same prompts, noise and rewards -> same advantages
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-5)
        assert a["reward_std"] == pytest.approx(b["reward_std"], abs=1e-5)
    for a, b in zip(steps(single), steps(zero2)[:4]):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert abs(steps(zero2)[0]["ratio_max"] - 1) <= 1e-5 and abs(steps(zero2)[0]["ratio_min"] - 1) <= 1e-5
    difference = max_difference(weights(runs["single"], 1), weights(runs["zero2"], 1))
    assert difference < 1e-5, difference
    assert max_difference(weights(runs["single"], 1), weights(runs["single"], 0)) > 1e-4  # training moved them


def test_zero2_halves_optimizer_state_per_rank(runs):
    single = [r for r in records(runs["single"]) if "rank" in r]
    zero2 = [r for r in records(runs["zero2"]) if "rank" in r]
    assert len(single) == 1 and [r["rank"] for r in zero2] == [0, 1]
    for row in zero2:
        assert row["optimizer_state_bytes"] == pytest.approx(single[0]["optimizer_state_bytes"] / 2, rel=0.01)
        assert row["param_bytes"] == single[0]["param_bytes"]  # ZeRO-2 keeps full parameters


def test_resume_equals_uninterrupted(runs):
    # Seen here: identical but for an occasional last-bit difference (1.2e-7) after DeepSpeed's reload.
    assert max_difference(weights(runs["zero2"], 2), weights(runs["resumed"], 2)) <= 1e-6
    straight = [r for r in records(runs["zero2"]) if "loss" in r and r["epoch"] == 2]
    resumed = [r for r in records(runs["resumed"]) if "loss" in r and r["epoch"] == 2]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [5, 6]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_zero3_trains_and_saves_a_loadable_unet(runs, tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel
    checkpoint = dict(list_checkpoints(runs["zero3"]))[0]
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], v) for k, v in unet.state_dict().items())
    memory = [r for r in records(runs["zero3"]) if "rank" in r]
    single = [r for r in records(runs["single"]) if "rank" in r][0]
    for row in memory:  # parameters, gradients and optimiser state are all sharded
        assert row["param_bytes"] < 0.6 * single["param_bytes"]
        assert row["grad_bytes"] == pytest.approx(single["grad_bytes"] / 2, rel=0.01)
        assert row["optimizer_state_bytes"] == pytest.approx(single["optimizer_state_bytes"] / 2, rel=0.01)
    # one epoch of 2 optimiser steps, each accumulating 2 micro-batches x 2 timesteps per rank
    steps_single = [r for r in records(runs["single"]) if "loss" in r and r["epoch"] == 0]
    steps_zero3 = [r for r in records(runs["zero3"]) if "loss" in r]
    assert len(steps_zero3) == len(steps_single) == 2
    for a, b in zip(steps_single, steps_zero3):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # Adam's first steps move each weight by about the learning rate times the sign of its gradient, so weights
    # whose gradient is ~0 can differ by up to 2 x lr; compare the whole update instead.
    base = load_file(str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    a, b = weights(runs["single"], 0), weights(runs["zero3"], 0)
    update = torch.sqrt(sum(((a[k] - base[k]).double() ** 2).sum() for k in a))
    difference = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in a))
    assert difference < 0.02 * update, (float(difference), float(update))


def test_bf16_zero2_keeps_the_first_step_on_policy(runs):
    steps = [r for r in records(runs["bf16"]) if "loss" in r]
    assert abs(steps[0]["ratio_max"] - 1) <= 1e-3 and abs(steps[0]["ratio_min"] - 1) <= 1e-3
    single = [r for r in records(runs["single"]) if "loss" in r][0]
    assert steps[0]["loss"] == pytest.approx(single["loss"], abs=0.05)  # the same samples, in bf16
    memory = [r for r in records(runs["bf16"]) if "rank" in r]
    fp32 = [r for r in records(runs["zero2"]) if "rank" in r]
    assert all(m["param_bytes"] * 2 == f["param_bytes"] for m, f in zip(memory, fp32))  # bf16 module weights


def test_real_deepspeed_checkpoints_pass_the_safety_scan(runs):
    """Every file DeepSpeed wrote (ZeRO-2, ZeRO-3, bf16) names only what the scan before a resume allows."""
    from fastgrpo.checkpoint import check_deepspeed_state, pickle_globals

    for name in ("zero2", "zero3", "bf16"):
        for _, checkpoint in list_checkpoints(runs[name]):
            files = list((checkpoint / "deepspeed").rglob("*.pt"))
            assert files and all(pickle_globals(f) for f in files)
            check_deepspeed_state(checkpoint)


NEW_OPTIONS = {"awm": ["train.objective=awm", "train.timestep_fraction=1.0", "train.matching_draws=2",
                       "train.kl_coef=0.1", "sample.sde_window_size=2", "sample.sde_window_schedule=random"],
               "nft": ["train.objective=nft", "train.matching_draws=2", "train.kl_coef=0.1", "train.nft_beta=0.5",
                       "train.timestep_range=[0.5,1.0]", "train.kl_timestep_range=[0.0,0.5]"],
               "ddpo_window": ["sample.sde_window_size=2", "sample.sde_window_schedule=sliding",
                               "sample.sde_window_shift_every=1"],
               "lr_cosine": ["train.lr_schedule=cosine", "train.lr_min_ratio=0.2"]}


@pytest.mark.parametrize("name", list(NEW_OPTIONS))
def test_objectives_and_windows_on_two_ranks_match_one_process(name, tmp_path, tiny_pipeline_dir, tiny_clip_files,
                                                               prompt_files):
    clip_config, clip_checkpoint = tiny_clip_files
    safe, unsafe = prompt_files
    base = [f"model.pretrained={tiny_pipeline_dir}", f"reward.clip_model={clip_config}",
            f"reward.clip_checkpoint={clip_checkpoint}", f"data.safe_prompts={safe}", f"data.unsafe_prompts={unsafe}",
            "sample.num_steps=4", "sample.group_size=4", "sample.batch_size=4", "train.learning_rate=1e-3",
            "train.clip_range=1e-2", "run.progress=false", "run.tensorboard=false", *SHAPE, "run.epochs=2",
            *NEW_OPTIONS[name]]
    single = train(load_config("smoke", base + [f"run.output_dir={tmp_path / 'single'}"]))
    zero2 = tmp_path / "zero2"
    launch(base + [f"run.output_dir={zero2}", "engine.deepspeed=zero2"], tmp_path)
    steps = lambda rs: [r for r in rs if "loss" in r]  # noqa: E731
    one, two = steps(records(single)), steps(records(zero2))
    assert len(one) == len(two) == 4
    if "train.objective=nft" in NEW_OPTIONS[name]:  # no ratio: the first step starts at the rollout predictions
        assert one[0]["deviation"] == 0.0 and one[-1]["deviation"] > 0
    else:
        assert one[0]["ratio_min"] == one[0]["ratio_max"] == 1.0
    for a, b in zip(one, two):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    if name == "lr_cosine":  # epoch 1 of 2 trains at 0.2 + 0.8 * (1 + cos(pi / 2)) / 2 = 0.6 of the peak
        assert [r["lr"] for r in one] == pytest.approx([1e-3, 1e-3, 6e-4, 6e-4], rel=1e-12)
    assert max_difference(weights(single, 1), weights(zero2, 1)) < 1e-5
    assert max_difference(weights(single, 1), weights(single, 0)) > 1e-4  # training moved them
