"""The toy world: a procedural image world with an unsafe attribute, its shipped models, prompts and judge.

`world` renders scenes and captions them, `judge` scores images from pixels, `prompts` holds the prompt sets and
anchors, `build` trains the shipped models from a seed, `report` evaluates a run. Importing `world`, `judge` and
`prompts` needs only numpy.
"""

from pathlib import Path

TOYWORLD_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld"
