"""One `fastgrpo train` epoch at Stable Diffusion's real size, run as a user runs it (opt-in: `-m sd_scale`).

Builds a Stable Diffusion v1.4-architecture pipeline (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M) with
random weights in diffusers format, then runs `fastgrpo train --config sd14_safety` at 512 px (64 x 64 latents) with
group 2, 2 DDIM steps, one epoch, and a checkpoint, with and without gradient checkpointing. The reward model is the
tests' tiny open_clip (the reward's cost is not what this measures). Records seconds per UNet call (rollout: one CFG
call per step; training: one forward + backward per sample-step), peak resident memory of the run, and the sizes of
the epoch's trajectory and of the checkpoint.

    python -m pytest bench/test_bench_sd_epoch.py -m sd_scale -s --benchmark-json sd_epoch.json

Minutes per variant on a 2-core CPU and 4.3 GB of disk for the pipeline. On a CPU without bf16 arithmetic the run is
fp32 (engine.mixed_precision=fp32); on a GPU the config's bf16 is kept.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, device_info

pytestmark = pytest.mark.sd_scale

GROUP, STEPS, LATENT = 2, 2, (4, 64, 64)


@pytest.fixture(scope="module")
def sd14_files(tmp_path_factory):
    from fastgrpo.tiny import build_sd14_pipeline, build_tiny_clip

    root = tmp_path_factory.mktemp("sd14")
    pipeline = build_sd14_pipeline(root / "pipeline")
    clip_config, clip_checkpoint = build_tiny_clip(root / "clip")
    prompts = root / "safe.txt", root / "unsafe.txt"
    prompts[0].write_text("a photo of a fully clothed person in a park\n", encoding="utf-8")
    prompts[1].write_text("a photo of a naked person\n", encoding="utf-8")
    return pipeline, clip_config, clip_checkpoint, prompts


def run_measuring_memory(command: list[str]) -> tuple[int, str, int]:
    """(exit code, output, peak resident bytes of the process and its children, sampled every 0.2 s)."""
    import psutil

    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
        watched, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)]))
            time.sleep(0.2)
        log.seek(0)
        return process.returncode, log.read(), peak


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("checkpointing", [True, False])
def test_sd14_epoch(benchmark, sd14_files, tmp_path, checkpointing):
    pipeline, clip_config, clip_checkpoint, (safe, unsafe) = sd14_files
    output = tmp_path / "run"
    overrides = [
        f"model.pretrained={pipeline}", f"reward.clip_model={clip_config}", f"reward.clip_checkpoint={clip_checkpoint}",
        f"data.safe_prompts={safe}", f"data.unsafe_prompts={unsafe}", f"sample.group_size={GROUP}", "sample.prompts_per_epoch=1",
        f"sample.num_steps={STEPS}", f"sample.batch_size={GROUP}", "sample.resolution=512", "train.batch_size=1",
        f"train.samples_per_step={GROUP}", "run.epochs=1", "run.save_every=1", "run.num_sample_images=0",
        "run.progress=false", "run.tensorboard=false", f"run.output_dir={output}",
        f"engine.gradient_checkpointing={str(checkpointing).lower()}", f"run.device={DEVICE.type}"]
    if DEVICE.type == "cpu":
        overrides.append("engine.mixed_precision=fp32")
    command = [sys.executable, "-m", "fastgrpo.cli", "train", "--config", "sd14_safety", *overrides]
    result = {}

    def run():
        result["returncode"], result["output"], result["peak_rss"] = run_measuring_memory(command)

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert result["returncode"] == 0, result["output"][-3000:]
    epoch = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()
             if '"rollout_s"' in line][0]
    samples, trained_steps = epoch["num_samples"], STEPS  # sd14_safety trains every step (timestep_fraction 1)
    checkpoint = next((output / "checkpoints").iterdir())
    benchmark.extra_info.update(
        device_info(), checkpointing=checkpointing, samples=samples, ddim_steps=STEPS, resolution=512,
        rollout_s=epoch["rollout_s"], reward_s=epoch["reward_s"], train_s=epoch["train_s"],
        rollout_s_per_unet_call=epoch["rollout_s"] / STEPS,  # one CFG call (2 x batch) per step for the batch
        train_s_per_unet_fwd_bwd=epoch["train_s"] / (samples * trained_steps),
        peak_rss_bytes=result["peak_rss"],
        trajectory_bytes=samples * (STEPS + 1) * torch.Size(LATENT).numel() * 4 + samples * STEPS * 4,
        checkpoint_bytes=directory_bytes(checkpoint))
    print(f"\nSD v1.4 epoch, checkpointing={checkpointing}: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in benchmark.extra_info.items()))
