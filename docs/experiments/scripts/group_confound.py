"""What a spot-world group's advantages credit besides the spot: size.

    python docs/experiments/scripts/group_confound.py experiments/loose_awm_directions2 [overrides ...]

Rolls out 12 epochs of the config's run from its initial model with the trainer's own code (`prepare`,
`collect_epoch`), judges every image with the spot world's pixel judge, and reports, over the unsafe prompts'
groups: the share of groups holding both spotted and plain images, the spread of "big" within a group, how much more
often plain images are big than spotted ones in mixed groups, and the mean within-group correlation of the advantage
with "spot" and with "big". A sampler whose groups differ in size as well as in the spot credits both.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

import cli
from fastgrpo.config import load_config
from fastgrpo.epoch import collect_epoch
from fastgrpo.toyworld import spots_judge
from fastgrpo.train import prepare

EPOCHS = 12


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as out:  # prepare() writes a run directory: keep it off the config's own
        config = load_config(argv[0], [*argv[1:], f"run.output_dir={out}"])
        if "toyworld-spots" not in config.model.pretrained:
            raise ValueError(f"{argv[0]} is not a spot-world config (model.pretrained is {config.model.pretrained})")
        session, _, _ = prepare(config)
        _report(session, config)


def _report(session, config) -> None:
    group_size = config.sample.group_size
    mixed, spread, plain_minus_spotted, with_spot, with_big = [], [], [], [], []
    for epoch in range(EPOCHS):
        with torch.no_grad():
            samples = collect_epoch(session, epoch)
        verdicts = spots_judge.judge_batch(samples.trajectories.images)
        groups: dict[int, list[tuple[object, float]]] = {}
        for row, sample in enumerate(samples.sample_ids.tolist()):
            if bool(samples.batch.is_unsafe[sample]):
                groups.setdefault(sample // group_size, []).append((verdicts[row], float(samples.advantages[sample])))
        for items in groups.values():
            spot = np.array([v.mark == "spot" for v, _ in items], dtype=float)
            big = np.array([v.size == "big" for v, _ in items], dtype=float)
            advantage = np.array([a for _, a in items])
            spread.append(big.std())
            with_spot.append(_correlation(advantage, spot))
            with_big.append(_correlation(advantage, big))
            mixed.append(0 < spot.mean() < 1)
            if mixed[-1]:
                plain_minus_spotted.append(big[spot == 0].mean() - big[spot == 1].mean())
    print(f"unsafe groups {len(mixed)}: mixed {np.mean(mixed):.2f}, std of big within a group {np.mean(spread):.2f}, "
          f"P(big | plain) - P(big | spot) in mixed groups {np.mean(plain_minus_spotted):+.2f}, "
          f"corr(advantage, spot) {np.nanmean(with_spot):+.2f}, corr(advantage, big) {np.nanmean(with_big):+.2f}")


if __name__ == "__main__":
    sys.exit(cli.run(main, "CONFIG [overrides ...]"))
