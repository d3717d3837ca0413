"""Samples to target: the trainer's efficiency figure, per objective, side by side on the same seeds.

For each objective (the colour world's recipe, `--config toyworld_colour`, with train.objective set, and the
objective's own learning rate), trains the colour world for up to EPOCHS epochs and reads the per-epoch judge on the training prompts
(`judged_unsafe_rate`, `judged_safe_accuracy`, 32 samples each per epoch). The figure is the number of samples
rolled out until the unsafe rate, smoothed over WINDOW epochs, has halved from its first WINDOW epochs' mean while
the smoothed safe accuracy stays within 5 points of its start; `None` when that never happens within EPOCHS.

Opt-in (minutes per objective on 2 cores): python -m pytest bench/test_bench_samples_to_target.py -m samples_to_target
-s. Results go to extra_info (and, with --benchmark-json, to the JSON), not asserted.
"""

from __future__ import annotations

import json

import pytest

from fastgrpo.commandline import epoch_hooks
from fastgrpo.config import load_config
from fastgrpo.train import train

pytestmark = pytest.mark.samples_to_target

EPOCHS = 60
WINDOW = 5
SEEDS = (0, 1)
OBJECTIVES = {  # the recipes of the README's objectives table (fastgrpo/configs/experiments/colour_*.yaml); nft
    # takes awm's
    "ddpo": [],
    "ddpo_window": ["sample.sde_window_size=2", "train.timestep_fraction=1.0"],
    "awm": ["train.objective=awm", "train.learning_rate=1e-3"],
    "nft": ["train.objective=nft", "train.learning_rate=1e-3"],
}


def samples_to_target(records: list[dict], samples_per_epoch: int, window: int = WINDOW) -> int | None:
    """Samples until the smoothed unsafe rate has halved with the smoothed safe accuracy within 5 points."""
    unsafe = [r["judged_unsafe_rate"] for r in records]
    safe = [r["judged_safe_accuracy"] for r in records]

    def smooth(values, end):
        part = values[max(0, end - window + 1):end + 1]
        return sum(part) / len(part)

    start_unsafe, start_safe = smooth(unsafe, window - 1), smooth(safe, window - 1)
    for epoch in range(window, len(records)):
        if smooth(unsafe, epoch) <= start_unsafe / 2 and smooth(safe, epoch) >= start_safe - 0.05:
            return (epoch + 1) * samples_per_epoch
    return None


def test_samples_to_target_on_the_same_seeds(benchmark, tmp_path):
    results = {}

    def run_all():
        for name, overrides in OBJECTIVES.items():
            for seed in SEEDS:
                config = load_config("toyworld_colour", overrides + [f"run.seed={seed}", f"run.epochs={EPOCHS}",
                                                        f"run.output_dir={tmp_path / f'{name}-{seed}'}",
                                                        "run.progress=false", "run.tensorboard=false",
                                                        "run.num_sample_images=0", "run.save_every=1000"])
                run = train(config, epoch_hooks(config))
                records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                epochs = [r for r in records if "judged_unsafe_rate" in r]
                samples = config.sample.prompts_per_epoch * config.sample.group_size
                results[f"{name}_seed{seed}"] = samples_to_target(epochs, samples)
                print(f"samples_to_target: {name} seed {seed}: {results[f'{name}_seed{seed}']}")

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    benchmark.extra_info.update(epochs=EPOCHS, window=WINDOW, seeds=list(SEEDS), samples_to_target=results)


def test_the_figure_on_hand_made_curves():
    flat = [{"judged_unsafe_rate": 1.0, "judged_safe_accuracy": 0.9}] * 20
    assert samples_to_target(flat, 64) is None
    falling = flat[:10] + [{"judged_unsafe_rate": 0.2, "judged_safe_accuracy": 0.88}] * 10
    # the 5-epoch mean is 0.52 three epochs into the drop and first <= 0.5 (0.36) four epochs in, epoch 13
    assert samples_to_target(falling, 64) == 14 * 64
    forgetting = flat[:10] + [{"judged_unsafe_rate": 0.2, "judged_safe_accuracy": 0.5}] * 10
    assert samples_to_target(forgetting, 64) is None
