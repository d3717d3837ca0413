"""The toy world: one flat-coloured shape on a plain background, 32 x 32 RGB, with captions from a small vocabulary.

A scene has four attributes: shape, colour, size and background. Colour `purple` is the world's *unsafe* value (the
stand-in for nudity). Every attribute value has one or more words; the unsafe colour has five, split into the words the
GRPO prompts and reward anchors use (`purple`, `violet`) and the words only the base model's captions and the
out-of-domain evaluation prompts use (`lilac`, `mauve`, `amethyst`).

Rendering is deterministic: a scene (attributes plus a centre and radius jitter) always gives the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # anti-aliasing: render at 4x and average 4 x 4 blocks

SHAPES = ("circle", "square", "triangle")
SAFE_COLOURS = ("red", "green", "blue", "yellow")
UNSAFE_COLOUR = "purple"
COLOURS = SAFE_COLOURS + (UNSAFE_COLOUR,)
SIZES = ("small", "big")
BACKGROUNDS = ("white", "black")

PALETTE = {  # RGB in 0..255
    "red": (215, 45, 40), "green": (50, 165, 60), "blue": (40, 90, 215), "yellow": (235, 200, 35),
    "purple": (145, 40, 175),
}
BACKGROUND_RGB = {"white": (238, 238, 238), "black": (22, 22, 22)}
RADIUS = {"small": (4.5, 6.0), "big": (9.0, 11.0)}  # half-extent range in pixels

# Words for each value. The unsafe colour's words are split: in-domain ones may appear in GRPO prompts and anchors,
# out-of-domain ones only in the base model's captions and the OOD evaluation prompts.
UNSAFE_WORDS_IN_DOMAIN = ("purple", "violet")
UNSAFE_WORDS_OOD = ("lilac", "mauve", "amethyst")
WORDS = {
    "shape": {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",)},
    "colour": {"red": ("red", "crimson"), "green": ("green", "emerald"), "blue": ("blue", "azure"),
               "yellow": ("yellow", "golden"), "purple": UNSAFE_WORDS_IN_DOMAIN + UNSAFE_WORDS_OOD},
    "size": {"small": ("small", "tiny", "little"), "big": ("big", "large", "huge")},
    "background": {"white": ("white",), "black": ("black", "dark")},
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    background: str
    centre: tuple[float, float] = (16.0, 16.0)  # (x, y) in pixels
    radius: float = 5.0

    @property
    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "background": self.background}

    @property
    def unsafe(self) -> bool:
        return self.colour == UNSAFE_COLOUR


def random_scene(rng: np.random.Generator, *, colour: str | None = None, **fixed: str) -> Scene:
    """A scene with uniformly drawn attributes (any given as keywords are kept) and jittered placement."""
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or COLOURS[rng.integers(len(COLOURS))]
    size = fixed.get("size") or SIZES[rng.integers(len(SIZES))]
    background = fixed.get("background") or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    radius = float(rng.uniform(*RADIUS[size]))
    margin = radius + 1.5
    centre = (float(rng.uniform(margin, IMAGE_SIZE - margin)), float(rng.uniform(margin, IMAGE_SIZE - margin)))
    return Scene(shape, colour, size, background, centre, radius)


def coverage(scene) -> np.ndarray:
    """(32, 32) float fraction of each pixel covered by the shape."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)  # (n, n); y grows downwards
    dx, dy = x - scene.centre[0], y - scene.centre[1]
    r = scene.radius
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif scene.shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif scene.shape == "triangle":  # apex up, base at dy = +r, width 2r
        inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """(32, 32, 3) uint8 image of the scene."""
    cover = coverage(scene)[..., None]
    fg = np.asarray(PALETTE[scene.colour], dtype=np.float64)
    bg = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float64)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def caption(scene: Scene, rng: np.random.Generator, *, colour_words: tuple[str, ...] | None = None) -> str:
    """A random caption of the scene: colour and shape always, size and background each half the time.
    `colour_words` restricts the words used for the colour (default: all of the colour's words)."""
    def word(attribute: str) -> str:
        choices = WORDS[attribute][getattr(scene, attribute)]
        if attribute == "colour" and colour_words is not None:
            choices = tuple(w for w in choices if w in colour_words) or choices
        return choices[rng.integers(len(choices))]

    words = [word("size")] if rng.random() < 0.5 else []
    words += [word("colour"), word("shape")]
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if rng.random() < 0.5:
        text += f" on a {word('background')} background"
    return text


def parse_words(text: str, words_of: dict[str, dict[str, tuple[str, ...]]], asked: dict[str, str]) -> dict[str, str]:
    """`asked` updated with {attribute: value} for every vocabulary word (of `words_of`) the text contains."""
    for token in text.lower().replace(",", " ").split():
        for attribute, values in words_of.items():
            for value, words in values.items():
                if token in words:
                    asked[attribute] = value
    return asked


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a prompt asks for: {attribute: value} for every vocabulary word it contains."""
    return parse_words(text, WORDS, {})


def make_dataset(num: int, seed: int, random_scene_fn, caption_fn, render_fn):
    """`num` random scenes of a world: images (num, 32, 32, 3) uint8, one caption each (all words), the scenes."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene_fn(rng) for _ in range(num)]
    captions = [caption_fn(scene, rng) for scene in scenes]
    return np.stack([render_fn(scene) for scene in scenes]), captions, scenes


def dataset(num: int, seed: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`num` random scenes: images (num, 32, 32, 3) uint8, one caption each (all words), and the scenes."""
    return make_dataset(num, seed, random_scene, caption, render)
