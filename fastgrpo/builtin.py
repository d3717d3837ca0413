"""Packaged assets and the `builtin:` names that address them (the package's one resolver).

- `builtin:tiny-random` (model.pretrained, reward.clip_model): tiny random models built on first use (`fastgrpo.tiny`).
- `builtin:NAME` (model.pretrained, reward.clip_model) for a folder `assets/NAME` holding `pipeline/` (a diffusers
  Stable Diffusion directory) and `clip/` (an open_clip config JSON and weights): a packaged model, such as the toy
  worlds' (`toyworld`, `toyworld-spots`, `toyworld-spots-loose`).
- `builtin:FILE` (prompt files): `assets/FILE`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
PREFIX = "builtin:"
TINY_RANDOM = "tiny-random"
# a packaged model's clip/ folder: open_clip's model-config JSON and the weights
CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE = "toyworld-clip.json", "toyworld-clip.safetensors"


def asset_path(value: str) -> Path:
    """'builtin:FILE' -> the packaged asset FILE; anything else is a filesystem path."""
    if value.startswith(PREFIX):
        return ASSETS_DIR / value.removeprefix(PREFIX)
    return Path(value).expanduser()


def packaged_models() -> list[str]:
    """Names of the packaged models (folders of assets/ with a pipeline/), sorted."""
    return sorted(p.parent.name for p in ASSETS_DIR.glob("*/pipeline") if p.is_dir())


def packaged_model(value: str) -> Path | None:
    """assets/NAME for 'builtin:NAME' when NAME is a packaged model, else None."""
    if not value.startswith(PREFIX):
        return None
    directory = ASSETS_DIR / value.removeprefix(PREFIX)
    return directory if value.removeprefix(PREFIX) in packaged_models() else None


def is_builtin_model(value: str) -> bool:
    return value == PREFIX + TINY_RANDOM or packaged_model(value) is not None


def unknown_builtin(value: str) -> str:
    """The one-line complaint for a 'builtin:' model name that names nothing."""
    known = ", ".join(PREFIX + name for name in [TINY_RANDOM, *packaged_models()])
    return f"{value!r} names no packaged model (known: {known})"


def pipeline_dir(value: str) -> Path | None:
    """The diffusers directory of a builtin model name (None for other values)."""
    if value == PREFIX + TINY_RANDOM:
        from fastgrpo.tiny import tiny_random_dir
        return tiny_random_dir() / "pipeline"
    directory = packaged_model(value)
    return None if directory is None else directory / "pipeline"


def clip_files(value: str) -> tuple[Path, Path] | None:
    """(open_clip config JSON, weights) of a builtin model name (None for other values)."""
    if value == PREFIX + TINY_RANDOM:
        from fastgrpo.tiny import tiny_random_dir
        return tiny_random_dir() / "clip" / "tiny-clip.json", tiny_random_dir() / "clip" / "tiny-clip.pt"
    directory = packaged_model(value)
    if directory is None:
        return None
    return directory / "clip" / CLIP_CONFIG_FILE, directory / "clip" / CLIP_WEIGHTS_FILE


def packaged_name(path: str | Path) -> str | None:
    """NAME when `path` is a packaged model's pipeline directory (given by its path rather than 'builtin:NAME')."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    resolved = path.resolve()
    return next((name for name in packaged_models() if (ASSETS_DIR / name / "pipeline").resolve() == resolved), None)
