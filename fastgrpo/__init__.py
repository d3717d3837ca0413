"""fastgrpo: GRPO safety post-training for text-to-image diffusion models.

Importing the package is cheap: the kernel API (`fastgrpo.ops`) needs only torch; the trainer's heavy
dependencies (diffusers, transformers, open_clip) load only when the trainer modules are imported.
"""

__version__ = "0.1.0"
