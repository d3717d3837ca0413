"""Where the matching objectives put their update: each (timestep, noise) draw's share of the first gradient, by
timestep.

    python docs/experiments/scripts/draw_weights.py experiments/loose_nft_directions2_kl03 [overrides ...]

Rolls out 4 epochs of the config's run from its initial model with the trainer's own code (`prepare`,
`collect_epoch`, the objective's own draws and predictions) and, for each draw of each trained sample, the size of
the loss's gradient with respect to the prediction at the rollout policy (pred = old), per objective:
    awm: 2 |A| ||pred - target|| / N                    (the surrogate's, at ratio 1)
    nft (x0): 2 |A| c ||pred - target|| / (N mean|pred - target|)   (the clean-latent weighting, c = x0_scale(t))
    nft (nft_weighting=prediction): the same with c = 1, the adaptive weight on the prediction's own error
with |A| clipped at train.adv_clip_max for both. It prints each objective's share of the summed gradient size by
quarter of the training timesteps (0 = clean, 999 = pure noise), its summed gradient size relative to awm's (what
an anchor such as train.kl_coef is weighed against) and the draws' c range. The difference is the
weighting alone: the draws, samples and advantages are the same.
"""

from __future__ import annotations

import sys
import tempfile

import torch

import cli
from fastgrpo import ops
from fastgrpo.config import load_config
from fastgrpo.epoch import collect_epoch
from fastgrpo.objectives import build_objective
from fastgrpo.train import prepare

EPOCHS = 4


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as out:  # prepare() writes a run directory: keep it off the config's own
        config = load_config(argv[0], [*argv[1:], f"run.output_dir={out}"])
        if config.train.objective == "ddpo":
            raise ValueError(f"{argv[0]} trains ddpo, which has no matching draws")
        session, _, _ = prepare(config)
        _report(session, config)


def _report(session, config) -> None:
    objective = build_objective(config)
    clip = config.train.adv_clip_max
    timesteps, scales = [], []
    sizes = {"awm": [], "nft (x0)": [], "nft (nft_weighting=prediction)": []}
    for epoch in range(EPOCHS):
        with torch.no_grad():
            samples = collect_epoch(session, epoch)
            draws, predictions, _, _ = objective.matching_inputs(session, samples)
            rows = torch.arange(draws.timesteps.shape[0])
            for k in range(draws.timesteps.shape[1]):
                units = torch.full_like(rows, k)
                cond, uncond, target, alpha_prod = predictions(session.unet, rows, units)
                guidance = objective._guidance(session)
                guided = ops.reference.guided_output(cond, uncond, guidance.guidance_scale)
                error = (guided - target).flatten(1)
                n = error.shape[1]
                advantage = samples.rows(samples.advantages).abs().clamp(max=clip).to(error.device)
                c = ops.reference.x0_scale(alpha_prod, guidance.prediction_type)
                unweighted = 2 * advantage * error.norm(dim=1) / n
                sizes["awm"].append(unweighted)
                sizes["nft (x0)"].append(unweighted * c / error.abs().mean(dim=1))
                sizes["nft (nft_weighting=prediction)"].append(unweighted / error.abs().mean(dim=1))
                timesteps.append(draws.timesteps[rows, units].cpu())
                scales.append(c.cpu())
    t = torch.cat(timesteps)
    c = torch.cat(scales)
    total_steps = session.models.scheduler.config.num_train_timesteps
    print(f"{t.numel()} draws; c = x0_scale from {float(c.min()):.3f} to {float(c.max()):.3f}")
    awm_total = float(torch.cat(sizes["awm"]).sum())
    for name, values in sizes.items():
        size = torch.cat(values).cpu()
        print(f"{name}: summed gradient size {float(size.sum()) / awm_total:.2f} x awm's")
        shares = [float(size[(t >= q * total_steps // 4) & (t < (q + 1) * total_steps // 4)].sum() / size.sum())
                  for q in range(4)]
        print(f"{name}: share of the gradient by timestep quarter (clean -> noise) "
              + " / ".join(f"{s:.2f}" for s in shares))


if __name__ == "__main__":
    sys.exit(cli.run(main, "CONFIG [overrides ...]"))
