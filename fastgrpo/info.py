"""`fastgrpo info` / `python -m fastgrpo.info`: which backend serves each op on each device, and why not the others."""

from __future__ import annotations

import torch

from fastgrpo.ops.dispatch import OPS, explain


def backend_table(devices: list[str] | None = None) -> str:
    """A text table: op x device -> chosen backend, then each rejected backend with its reason."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}", ""]
    for device in devices:
        for op in OPS:
            chosen, rejected = explain(op, device)
            lines.append(f"{op:<17} {device:<5} -> {chosen or 'none'}")
            lines.extend(f"{'':<24}not {name}: {why}" for name, why in rejected.items())
    return "\n".join(lines) + "\n"


def main() -> int:
    print(backend_table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
