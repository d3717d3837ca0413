"""Wall time of the toy-world recipes as `fastgrpo train` runs them, side by side: the embedded default (the loose
spot world's nft recipe), the same with `engine.attention=sdpa` (PyTorch's attention instead of the small-head C++
kernel that the default's `auto` picks on CPU: the before/after of that kernel), and `--config toyworld_colour` (the
paper's ddpo on the colour world).

Each round runs `fastgrpo train` for EPOCHS epochs of each recipe in a subprocess, rotating their order, so all
see the same machine load. extra_info holds each recipe's median epoch (rollout + reward + training, from
metrics.jsonl), the process start-up and saving, the projected full run (start-up + the config's epochs x median
epoch) and the ratio of the two projections. The default's target is a full run within 10 minutes on 2 cores.

    python -m pytest bench/test_bench_toyworld.py -s
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from conftest import device_info
from fastgrpo.config import load_config

RECIPES = {"default": ("default", []), "default_sdpa": ("default", ["engine.attention=sdpa"]),
           "toyworld_colour": ("toyworld_colour", [])}
EPOCHS, ROUNDS = 3, 3


def run_recipe(config: str, overrides: list[str], output) -> tuple[float, list[float]]:
    """(wall seconds of the whole process, per-epoch seconds from metrics.jsonl)."""
    command = [sys.executable, "-m", "fastgrpo.cli", "train", "--config", config, *overrides, f"run.epochs={EPOCHS}",
               f"run.save_every={EPOCHS}", "run.num_sample_images=0", "run.progress=false", "run.tensorboard=false",
               f"run.output_dir={output}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["rollout_s"] + r["reward_s"] + r["train_s"] for r in lines if "rollout_s" in r]
    return wall, epochs


def test_default_run_time(benchmark, tmp_path):
    results = {name: {"wall": [], "epochs": []} for name in RECIPES}

    def rounds():
        for index in range(ROUNDS):
            names = list(RECIPES)
            for name in names[index % len(names):] + names[:index % len(names)]:
                wall, epochs = run_recipe(*RECIPES[name], tmp_path / f"{name}_{index}")
                results[name]["wall"].append(wall)
                results[name]["epochs"].extend(epochs)

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    info = {}
    for name, (config, overrides) in RECIPES.items():
        epoch = statistics.median(results[name]["epochs"])
        startup = statistics.median(w - sum(results[name]["epochs"][i * EPOCHS:(i + 1) * EPOCHS])
                                    for i, w in enumerate(results[name]["wall"]))
        epochs = load_config(config).run.epochs
        info[name] = {"config": config, "overrides": overrides, "epochs": epochs, "median_epoch_s": round(epoch, 2),
                      "startup_s": round(startup, 2), "projected_run_s": round(startup + epochs * epoch, 1)}
    projected = {name: info[name]["projected_run_s"] for name in RECIPES}
    info["speedup_default_vs_sdpa"] = round(projected["default_sdpa"] / projected["default"], 2)
    info["ratio_default_to_colour"] = round(projected["default"] / projected["toyworld_colour"], 2)
    benchmark.extra_info.update(device_info(), **info)
    print("\n" + json.dumps(info, indent=1))
    assert all(info[name]["median_epoch_s"] > 0 for name in RECIPES)
