"""Train a toy world's models from a seed: `python -m fastgrpo.toyworld.build --world NAME --out DIR`.

Writes the prompt sets (DIR/*.txt), DIR/pipeline (a diffusers Stable Diffusion directory: UNet, VAE, CLIP text encoder, tokenizer, DDIM scheduler)
and DIR/clip (an open_clip model-config JSON plus a safetensors checkpoint, the reward model). Stages:
  1. VAE (AutoencoderKL, 32 x 32 x 3 -> 8 x 8 x 4) on renders, MSE + a small KL term;
  2. text encoder + UNet together on VAE latents of renders with random captions (10% empty, for guidance),
     epsilon prediction with SD v1.x's noise schedule, an EMA of the UNet weights is saved;
  3. open_clip CLIP, contrastive, where every caption that fits an image counts as its positive.
The defaults take about 40 minutes on 2 CPU cores (the colour and spot worlds). A world with a `base` (the loose spot
world) instead fine-tunes that world's UNet and text encoder on its own training captions (`finetune`, about 10
minutes) and copies the rest.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastgrpo.builtin import CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE
from fastgrpo.toyworld import WORLDS, ToyWorld, world

CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": world.IMAGE_SIZE, "layers": 3, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TEXT_LENGTH = 24
CAPTION_DROPOUT = 0.1
COLOUR_WORLD = "toyworld"  # what `build` makes unless --world names another (the world every other one builds on)
FINETUNE_LR = 2e-4  # peak learning rate when a world fine-tunes another world's UNet and text encoder


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _cosine_lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_autoencoder(images: torch.Tensor, *, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=world.IMAGE_SIZE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        batch = images[torch.randint(len(images), (batch_size,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} mse {F.mse_loss(recon, batch).item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, min(len(images), 2048), 256)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return vae


def build_text_encoder(tokenizer_dir: Path, *, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from fastgrpo.tiny import _write_clip_tokenizer

    vocab_size = _write_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                              model_max_length=TEXT_LENGTH)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1))
    return tokenizer, text_encoder


def _scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def train_diffusion(latent_mean, latent_std, scenes, tokenizer, text_encoder, *, steps: int, batch_size: int = 128,
                    lr: float = 5e-4, seed: int = 0, ema_decay: float = 0.999, scene_module=world, unet=None,
                    caption=None, warmup: int = 100):
    """Train UNet and text encoder together; returns (EMA UNet, text encoder). `unet` (default: a new one) and
    `caption` (default: scene_module.caption) let a world fine-tune another world's models on its own captions."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if unet is None:
        unet = UNet2DConditionModel(
            sample_size=latent_mean.shape[-1], in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(48, 96), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            attention_head_dim=16, norm_num_groups=16)
    caption = caption or scene_module.caption
    unet.train().requires_grad_(True)
    text_encoder.requires_grad_(True)
    ema = copy.deepcopy(unet).requires_grad_(False)
    alphas = _scheduler().alphas_cumprod.float()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    text_encoder.train()
    token_cache: dict[str, torch.Tensor] = {}

    def tokens(texts):
        missing = [t for t in dict.fromkeys(texts) if t not in token_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                            return_tensors="pt").input_ids
            token_cache.update(zip(missing, ids))
        return torch.stack([token_cache[t] for t in texts])

    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup)
        index = torch.randint(len(scenes), (batch_size,), generator=gen)
        texts = ["" if rng.random() < CAPTION_DROPOUT else caption(scenes[i], rng) for i in index.tolist()]
        latents = latent_mean[index] + latent_std[index] * torch.randn(latent_mean[index].shape, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(len(alphas), (batch_size,), generator=gen)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        hidden = text_encoder(tokens(texts))[0]
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 200 == 0 or step == steps - 1:
            _log(f"unet step {step}/{steps} loss {loss.item():.4f}")
    text_encoder.eval().requires_grad_(False)
    return ema.eval(), text_encoder


def train_clip(images: torch.Tensor, scenes, *, steps: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
               scene_module=world):
    """open_clip CLIP trained contrastively; all captions consistent with an image are its positives."""
    import open_clip
    from open_clip.model import CLIP

    from fastgrpo.reward import preprocess_images

    torch.manual_seed(seed)
    model = CLIP(**CLIP_CONFIG)
    tokenizer = open_clip.SimpleTokenizer(context_length=CLIP_CONFIG["text_cfg"]["context_length"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed + 1)
    gen = torch.Generator().manual_seed(seed + 1)
    pixels01 = (images + 1) / 2
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        index = torch.randint(len(scenes), (batch_size,), generator=gen).tolist()
        texts = [scene_module.caption(scenes[i], rng) for i in index]
        asked = [scene_module.parse_prompt(t) for t in texts]
        # positives[i, j]: caption j describes image i
        positives = torch.tensor([[all(scenes[i].attributes[a] == v for a, v in q.items()) for q in asked]
                                  for i in index], dtype=torch.float32)
        batch = pixels01[index] + 0.02 * torch.randn(pixels01[index].shape, generator=gen)  # robustness to noise
        batch = preprocess_images(batch.clamp(0, 1), (world.IMAGE_SIZE, world.IMAGE_SIZE),
                                  (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        image_z, text_z, scale = model(batch, tokenizer(texts))
        logits = scale * image_z @ text_z.T                                  # (B images, B texts)
        loss = 0.5 * (-(F.log_softmax(logits, 1) * positives / positives.sum(1, keepdim=True)).sum(1).mean()
                      - (F.log_softmax(logits, 0) * positives / positives.sum(0, keepdim=True)).sum(0).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            _log(f"clip step {step}/{steps} loss {loss.item():.4f}")
    return model.eval()


def save_pipeline(directory: Path, unet, vae, text_encoder, tokenizer) -> None:
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory)


def save_clip(directory: Path, model) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CLIP_CONFIG_FILE).write_text(json.dumps(CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / CLIP_WEIGHTS_FILE))


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's posterior for images (N, 3, H, W) in [-1, 1], scaled like the UNet's latents."""
    dists = [vae.encode(images[i:i + 512]).latent_dist for i in range(0, len(images), 512)]
    scale = vae.config.scaling_factor
    return torch.cat([d.mean for d in dists]) * scale, torch.cat([d.std for d in dists]) * scale


def write_prompt_files(directory: Path, toy: ToyWorld = WORLDS[COLOUR_WORLD]) -> None:
    """The world's prompt sets as .txt files (one prompt per line)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, prompts in toy.prompts.PROMPT_FILES.items():
        (directory / name).write_text("\n".join(prompts) + "\n", encoding="utf-8")


def build(out: Path, *, seed: int, num_images: int, vae_steps: int, unet_steps: int, clip_steps: int,
          toy: ToyWorld = WORLDS[COLOUR_WORLD]) -> None:
    scene_module = toy.world
    write_prompt_files(out, toy)
    images_u8, _, scenes = scene_module.dataset(num_images, seed)
    images = _to_tensor(images_u8)
    _log(f"{num_images} renders")
    vae = train_autoencoder(images, steps=vae_steps, seed=seed)
    latent_mean, latent_std = encode_latents(vae, images)
    tokenizer, text_encoder = build_text_encoder(out / "pipeline" / "tokenizer", seed=seed)
    unet, text_encoder = train_diffusion(latent_mean, latent_std, scenes, tokenizer, text_encoder,
                                         steps=unet_steps, seed=seed, scene_module=scene_module)
    save_pipeline(out / "pipeline", unet, vae, text_encoder, tokenizer)
    _log(f"saved {out / 'pipeline'}")
    save_clip(out / "clip", train_clip(images, scenes, steps=clip_steps, seed=seed, scene_module=scene_module))
    _log(f"saved {out / 'clip'}")


def finetune(out: Path, *, seed: int, num_images: int, unet_steps: int, toy: ToyWorld) -> None:
    """A world whose base model is another world's (`toy.base`) trained further on this world's training captions:
    the other world's VAE, tokenizer and reward CLIP are copied, its UNet and text encoder fine-tuned."""
    import shutil

    from fastgrpo.models import configure_unet, load_diffusion_models

    base = WORLDS[toy.base]
    write_prompt_files(out, toy)
    models = load_diffusion_models(f"builtin:{base.name}", device=torch.device("cpu"))
    images_u8, _, scenes = toy.world.dataset(num_images, seed)
    images = _to_tensor(images_u8)
    latent_mean, latent_std = encode_latents(models.vae, images)
    _log(f"{num_images} renders; fine-tuning {base.name}'s UNet and text encoder")
    configure_unet(models.unet, attention="auto", gradient_checkpointing=False)
    unet, text_encoder = train_diffusion(latent_mean, latent_std, scenes, models.tokenizer, models.text_encoder,
                                         steps=unet_steps, lr=FINETUNE_LR, seed=seed + 1, ema_decay=0.995,
                                         unet=models.unet, caption=getattr(toy.world, toy.caption), warmup=50)
    save_pipeline(out / "pipeline", unet, models.vae, text_encoder, models.tokenizer)
    shutil.copytree(base.directory / "clip", out / "clip", dirs_exist_ok=True)
    _log(f"saved {out / 'pipeline'} and {out / 'clip'} ({base.name}'s reward CLIP)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgrpo.toyworld.build", description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=sorted(WORLDS), default=COLOUR_WORLD, help="which toy world")
    parser.add_argument("--out", type=Path, required=True, help="output directory (pipeline/ and clip/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--unet-steps", type=int, default=None,
                        help="UNet steps (default: 2000; 1000 for a world that fine-tunes another's)")
    parser.add_argument("--clip-steps", type=int, default=1000)
    args = parser.parse_args(argv)
    toy = WORLDS[args.world]
    if toy.base is not None:
        finetune(args.out, seed=args.seed, num_images=args.num_images, unet_steps=args.unet_steps or 1000, toy=toy)
        return 0
    build(args.out, seed=args.seed, num_images=args.num_images, vae_steps=args.vae_steps,
          unet_steps=args.unet_steps or 2000, clip_steps=args.clip_steps, toy=toy)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
