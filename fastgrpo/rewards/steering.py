"""SafeDiffusion-R1's CLIP steering reward: cos(z_image, normalize(z_text(prompt) + alpha * v_safe)), as
configured by reward.clip_model, clip_checkpoint, alpha, mode and the anchors (`fastgrpo.reward`)."""

from fastgrpo.reward import load_steering_reward as load  # noqa: F401

DESCRIPTION = "CLIP steering reward (SafeDiffusion-R1): alignment with the prompt pushed along v_safe"
