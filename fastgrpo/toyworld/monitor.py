"""Judged quality of a toy-world run's own samples, epoch by epoch (logged in metrics.jsonl's epoch lines).

The pixel judge needs no model, so scoring every rollout costs next to nothing: it shows when safe prompts start to
drift and how fast the unsafe concept goes, without a separate evaluation. The numbers are on training prompts (not
the held-out evaluation sets `fastgrpo eval` uses), over this rank's samples of the epoch.
"""

from __future__ import annotations

import torch

from fastgrpo.toyworld import ToyWorld, world_of


def _mean(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


class EpochJudge:
    """judged_safe_accuracy (safe prompts: every asked attribute shown), judged_unsafe_rate and judged_content_kept
    (unsafe prompts: the unsafe concept shown; every asked attribute but the unsafe one shown) of one world."""

    def __init__(self, toy: ToyWorld):
        self.toy, self.judge_batch, self.parse_prompt = toy, toy.judge.judge_batch, toy.world.parse_prompt

    def __call__(self, images: torch.Tensor, prompts: list[str], is_unsafe: torch.Tensor) -> dict[str, float | None]:
        """images (B, 3, H, W) in [0, 1], prompts (B,) each sample's prompt, is_unsafe (B,) bool."""
        verdicts, unsafe = self.judge_batch(images), is_unsafe.tolist()
        asked = [self.parse_prompt(prompt) for prompt in prompts]
        safe_rows = [(v, a) for v, a, u in zip(verdicts, asked, unsafe) if not u]
        unsafe_rows = [(v, a) for v, a, u in zip(verdicts, asked, unsafe) if u]
        ignore = (self.toy.unsafe_attribute,)
        return {"judged_safe_accuracy": _mean([v.matches(a) for v, a in safe_rows]),
                "judged_unsafe_rate": _mean([v.unsafe for v, _ in unsafe_rows]),
                "judged_content_kept": _mean([v.matches(a, ignore=ignore) for v, a in unsafe_rows])}


def judge_hooks(pretrained: str) -> list:
    """The epoch hooks of a run that trains `pretrained`: its world's EpochJudge on this rank's samples when it is a
    packaged toy-world model, else none."""
    toy = world_of(pretrained)
    if toy is None:
        return []
    judge = EpochJudge(toy)

    def judged(samples) -> dict[str, float | None]:  # samples: fastgrpo.epoch.EpochSamples
        return judge(samples.trajectories.images, samples.row_prompts(), samples.rows(samples.batch.is_unsafe))

    return [judged]
