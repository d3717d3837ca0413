"""How much of a GRPO update is signal: `python -m fastgrpo.gradient_snr [--config ...] [--epochs R] [key=value ...]`.

Samples R independent epochs of the configured run from its *initial* model with the trainer's own epoch code
(`fastgrpo.epoch.collect_epoch`: prompt mix, rollout, reward, group advantages, the update plan) and computes each
epoch's policy gradient on the trainable parameters with the run's objective (`train.objective`) at the on-policy
point (ratio 1), where the clipped loss's gradient is that of -mean(A * log p) over the planned (sample, step) pairs
for ddpo and -mean(A * s) over the (sample, draw) pairs for awm's surrogate s. It does this separately for the safe
and the unsafe prompts' samples (and their sum, the epoch's update direction).

Each epoch's gradient g_i = mu + noise_i. The part every epoch shares, |mu|^2, is estimated without bias by the
mean of g_i . g_j over pairs i != j; the rest of E|g_i|^2 is the noise. Their ratio (`snr`, signal over noise
energy, per epoch of samples) says how many epochs of samples an update would have to average before its direction
is half signal: 1 / snr. A standard error comes from the jackknife over epochs.

Writes one line per kind and, with --json FILE, the numbers as JSON. Nothing trains and no run directory is written.
The loss is the objective's own, so train.ratio_norm's scaling, the SDE window and train.safe_advantages and
train.drop_zero_std_groups apply as in training; a KL penalty's gradient is zero at the initial model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch

KINDS = ("unsafe", "safe", "all")


@dataclass(frozen=True)
class SignalToNoise:
    signal: float          # |mu|^2: mean over pairs i != j of g_i . g_j
    noise: float           # E|g_i - mu|^2 = mean |g_i|^2 - signal
    snr: float             # signal / noise (per epoch of samples)
    snr_stderr: float      # jackknife standard error of snr
    mean_cosine: float     # mean over pairs i != j of cos(g_i, g_j)
    epochs: int


def _ratio(gram: torch.Tensor) -> tuple[float, float, float]:
    n = gram.shape[0]
    total = gram.sum() - gram.diagonal().sum()
    signal = float(total / (n * (n - 1)))
    noise = float(gram.diagonal().mean()) - signal
    return signal, noise, signal / noise if noise > 0 else math.inf


def signal_to_noise(gradients: torch.Tensor) -> SignalToNoise:
    """gradients (R, P), one row per independent epoch (R >= 3): the split of their energy into the shared part and
    the rest, in float64."""
    if gradients.dim() != 2 or gradients.shape[0] < 3:
        raise ValueError(f"signal_to_noise: need (R >= 3, P) gradients, got {tuple(gradients.shape)}")
    g = gradients.double()
    gram = g @ g.T                                                              # (R, R)
    n = gram.shape[0]
    signal, noise, snr = _ratio(gram)
    keep = torch.ones(n, dtype=torch.bool)
    leave_one_out = []
    for i in range(n):
        keep[i] = False
        leave_one_out.append(_ratio(gram[keep][:, keep])[2])
        keep[i] = True
    loo = torch.tensor(leave_one_out, dtype=torch.float64)
    stderr = float(((n - 1) / n * ((loo - loo.mean()) ** 2).sum()).sqrt())
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    cosine = gram / norms[:, None] / norms[None, :]
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    return SignalToNoise(signal, noise, snr, stderr, float(cosine[off_diagonal].mean()), n)


def epoch_gradients(config, epochs: int) -> dict[str, torch.Tensor]:
    """{kind: (epochs, P)} policy gradients of `epochs` independent epochs of `config`'s run at its initial model."""
    from fastgrpo.epoch import collect_epoch
    from fastgrpo.errors import ConfigError
    from fastgrpo.grpo import UpdatePlan, micro_batches
    from fastgrpo.train import prepare

    if config.engine.deepspeed is not None:
        raise ConfigError("gradient_snr runs in one process: leave engine.deepspeed unset")
    session, _, _ = prepare(config)
    unet, t = session.unet, config.train
    params = [p for p in unet.parameters() if p.requires_grad]
    rows: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}
    for epoch in range(epochs):
        with torch.no_grad():
            samples = collect_epoch(session, epoch)
        advantages = samples.rows(samples.advantages * samples.keep)               # (M,) by trajectory row
        unsafe = samples.rows(samples.batch.is_unsafe)
        shard = samples.batch.shard
        plan = UpdatePlan(torch.arange(shard.order.shape[0], device=session.device), shard.steps.to(session.device))
        batches = next(micro_batches(plan, batch_size=t.batch_size, samples_per_step=plan.order.shape[0]))
        unet.train()
        per_kind = {}
        for kind, mask in (("unsafe", unsafe), ("safe", ~unsafe)):
            for p in params:
                p.grad = None
            loss_fn = session.objective.loss_fn(session, samples, advantages * mask)   # on-policy: ratio 1
            for batch_rows, k in batches:  # the mean over every (sample, unit) pair, as one optimiser step takes it
                loss, _ = loss_fn(plan.order[batch_rows], plan.steps[batch_rows, k])
                (loss / len(batches)).backward()
            per_kind[kind] = torch.cat([p.grad.flatten().double() for p in params])
        for kind in ("unsafe", "safe"):
            rows[kind].append(per_kind[kind])
        rows["all"].append(per_kind["unsafe"] + per_kind["safe"])
        print(f"gradient_snr: epoch {epoch + 1}/{epochs}", file=sys.stderr, flush=True)
    return {kind: torch.stack(values) for kind, values in rows.items()}


def _run(args) -> int:
    from fastgrpo.commandline import config_from_args
    from fastgrpo.errors import ConfigError

    if args.epochs < 3:
        raise ConfigError(f"gradient_snr: --epochs must be >= 3, got {args.epochs}")
    config = config_from_args(args)
    results = {kind: signal_to_noise(g) for kind, g in epoch_gradients(config, args.epochs).items()}
    samples = config.sample.prompts_per_epoch * config.sample.group_size
    print(f"gradient_snr: {args.epochs} epochs of {samples} samples from the initial model")
    for kind, r in results.items():
        needed = f"{1 / r.snr:.0f}" if r.snr > 0 else "inf"
        print(f"  {kind:6s} prompts: signal/noise {r.snr:.4f} +- {r.snr_stderr:.4f} per epoch, mean cosine "
              f"{r.mean_cosine:+.4f}; epochs of samples for a half-signal update: {needed}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"epochs": args.epochs, "samples_per_epoch": samples,
                       **{kind: asdict(r) for kind, r in results.items()}}, handle, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    from fastgrpo.commandline import add_config_arguments, run_command

    parser = argparse.ArgumentParser(prog="python -m fastgrpo.gradient_snr", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--epochs", type=int, default=48,
                        help="independent epochs to sample (>= 3); 48 resolve awm's signal on the colour world to "
                             "about 4 standard errors, 24 to about 3")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    return run_command(_run, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
