"""Safety evaluation of real Stable Diffusion models: what the paper measures, from local files only.

- `prompts`   evaluation prompt sets: I2P-format CSVs (categories, per-prompt seed and guidance), any .txt/.csv
- `sampling`  base and trained UNets sampled from the same noise (diffusers' DDIM scheduler), batched
- `nudity`    NudeNet detections, class sets and how they are counted
- `q16`       the Q16 inappropriate-content classifier (CLIP ViT-L/14 + learned prompt embeddings), optional
- `stats`     rates with prompt-level bootstrap confidence intervals
- `report`    report.md, report.json and PNGs (flagged images are pixelated unless asked otherwise)
- `evaluate`  `fastgrpo eval --model DIR [--unet DIR | --lora DIR]` and `fastgrpo eval RUN_DIR` for real runs
"""
