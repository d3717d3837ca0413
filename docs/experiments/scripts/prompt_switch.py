"""At which sampler steps does a spot prompt decide the spot, and at which the content?

    python docs/experiments/scripts/prompt_switch.py RUN_DIR [PROMPTS]

For the first PROMPTS (default 48) unsafe training prompts of a spot-world run, 4 images each from the run's base
model (the evaluation sampler, seed 7), conditioned on the spot prompt for some steps and on the same prompt with
its spot word removed for the others:

    spot until k      the spot prompt for steps [0, k), the plain prompt for [k, S)
    spot from k       the plain prompt for steps [0, k), the spot prompt for [k, S)
    content until k   the spot prompt for steps [0, k), another prompt's plain version (other colour, shape, ...)
    content from k    the other plain prompt for steps [0, k), the spot prompt for [k, S)

and the toy world's judge reads each image: how many show the spot, how many keep the asked-for content, and per
attribute how many show the first prompt's value and how many the second's. `spot until k` stays plain until the
steps that decide the spot; `content until k` takes the first prompt's attributes from the steps that decide them.
"""

from __future__ import annotations

import sys

import torch

import cli
from fastgrpo.diffusion import configured_sampler, decode_latents, draw_noise, unet_outputs
from fastgrpo.evaluate import EVAL_EPOCH, load_policies, load_run, toy_world_of
from fastgrpo.models import encode_prompts
from fastgrpo import ops
from fastgrpo.prompts import load_prompts

IMAGES = 4


def plain_prompt(text: str, words: tuple[str, ...]) -> str:
    """The prompt without its spot word ('a spotted red circle' -> 'a red circle')."""
    kept = [word for word in text.split(" ") if word not in words]
    if kept[0] in ("a", "an"):
        kept[0] = "an" if kept[1][0] in "aeiou" else "a"
    return " ".join(kept)


@torch.no_grad()
def sample(policies, unet, spot_embeds, plain_embeds, uncond, use_spot: list[bool], seed: int) -> torch.Tensor:
    config, models = policies.config, policies.models
    schedule, guidance = configured_sampler(config.sample, models, spot_embeds.device)
    batch = spot_embeds.shape[0]
    ids = torch.arange(batch)
    noise = draw_noise(seed, EVAL_EPOCH, ids, ids, schedule.num_steps,
                       models.latent_shape(config.sample.resolution), same_noise_per_group=False,
                       device=spot_embeds.device)
    latents = noise[:, 0]
    for step in range(schedule.num_steps):
        cond = spot_embeds if use_spot[step] else plain_embeds
        timesteps = schedule.timesteps[step].expand(batch)
        c, u = unet_outputs(unet, latents, timesteps, cond, uncond.expand_as(cond), guidance)
        latents, _ = ops.ddim_step(c, latents, schedule.alpha_prod_t[step].expand(batch),
                                   schedule.alpha_prod_t_prev[step].expand(batch), noise[:, step + 1],
                                   eta=guidance.eta, uncond_output=u, guidance_scale=guidance.guidance_scale,
                                   prediction_type=guidance.prediction_type, backend=guidance.backend)
    return decode_latents(models.vae, latents)


def main(argv: list[str]) -> None:
    config, checkpoint = load_run(argv[0])
    count = int(argv[1]) if len(argv) > 1 else 48
    toy = toy_world_of(config)
    if toy is None or toy.unsafe_attribute != "mark":
        raise ValueError(f"{argv[0]} does not train a spot world (model.pretrained is {config.model.pretrained})")
    words = toy.world.WORDS["mark"]["spot"]
    policies = load_policies(config, checkpoint, torch.device("cpu"))
    prompts = load_prompts(config.data.unsafe_prompts, config.data.unsafe_column)[:count]
    prompts = [p for p in prompts for _ in range(IMAGES)]
    models = policies.models
    spot = encode_prompts(models, prompts)
    plain = encode_prompts(models, [plain_prompt(p, words) for p in prompts])
    uncond = encode_prompts(models, [""])
    asked = [toy.world.parse_prompt(p) for p in prompts]
    steps = config.sample.num_steps
    # the content switch: another plain prompt (the list rotated by half) for the steps the spot prompt leaves
    other_prompts = [plain_prompt(p, words) for p in prompts[len(prompts) // 2:] + prompts[:len(prompts) // 2]]
    other = encode_prompts(models, other_prompts)
    other_asked = [toy.world.parse_prompt(p) for p in other_prompts]
    attributes = [a for a in asked[0] if a != toy.unsafe_attribute]
    print(f"{len(prompts)} images ({count} prompts x {IMAGES}), {steps} steps, base model")
    print("switch", "k", "spotted", "content kept", *(f"{a}: first / second" for a in attributes), sep="\t")
    for label, second in (("spot", plain), ("content", other)):
        for order, rule in (("until", lambda k, j: j < k), ("from", lambda k, j: j >= k)):
            for k in range(steps + 1):
                images = sample(policies, models.unet, spot, second, uncond, [rule(k, j) for j in range(steps)], 7)
                verdicts = toy.judge.judge_batch(images)
                spotted = sum(v.unsafe for v in verdicts) / len(verdicts)
                kept = sum(v.matches(a, ignore=(toy.unsafe_attribute,)) for v, a in zip(verdicts, asked))
                share = []
                for attribute in attributes:
                    first = sum(v.attributes[attribute] == a[attribute] for v, a in zip(verdicts, asked))
                    then = sum(v.attributes[attribute] == a[attribute] for v, a in zip(verdicts, other_asked))
                    share.append(f"{first / len(verdicts):.2f} / {then / len(verdicts):.2f}")
                print(f"{label} {order}", k, f"{spotted:.3f}", f"{kept / len(verdicts):.3f}", *share, sep="\t",
                      flush=True)


if __name__ == "__main__":
    sys.exit(cli.run(main, "RUN_DIR [PROMPTS]"))
