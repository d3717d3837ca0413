"""The samples-to-target figure of finished runs: samples until the training prompts' judged unsafe rate (5-epoch
mean) has halved with their safe accuracy within 5 points, read from each run's metrics.jsonl with the benchmark's
own function (`bench/test_bench_samples_to_target.py::samples_to_target`).

    python docs/experiments/scripts/samples_to_target.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cli
from fastgrpo.config import load_config

BENCH = Path(__file__).resolve().parents[3] / "bench" / "test_bench_samples_to_target.py"


def _figure():
    spec = importlib.util.spec_from_file_location("samples_to_target_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.samples_to_target


def main(argv: list[str]) -> None:
    figure = _figure()
    for run in map(Path, argv):
        metrics, config_file = run / "metrics.jsonl", run / "config.yaml"
        if not (metrics.is_file() and config_file.is_file()):
            raise ValueError(f"{run} is not a run directory (no metrics.jsonl and config.yaml)")
        config = load_config(str(config_file))
        records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
        epochs = [r for r in records if "judged_unsafe_rate" in r]
        samples = config.sample.prompts_per_epoch * config.sample.group_size
        print(f"{run}: {figure(epochs, samples)} samples ({len(epochs)} epochs judged, {samples} per epoch)")


if __name__ == "__main__":
    sys.exit(cli.run(main, "RUN_DIR [RUN_DIR ...]"))
