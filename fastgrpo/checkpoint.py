"""Atomic checkpoints: <output_dir>/checkpoints/epoch_<N>/{unet/, trainer_state.pt}, keeping the last K.

A checkpoint is written to a hidden staging directory and renamed into place, so a kill mid-save leaves the previous
checkpoints intact. `unet/` is diffusers' save_pretrained format (a stock pipeline can load it).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from fastgrpo.errors import FastGRPOError, NonFiniteError

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^epoch_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (epoch, path), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and is_complete(p)]
    return sorted(found)


def is_complete(path: Path) -> bool:
    """The state file is written last inside the staging directory, which is renamed into place whole."""
    return (path / STATE_FILE).is_file()


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values (what weights_only loading accepts)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_unet(unet: torch.nn.Module, directory: Path) -> None:
    """directory/unet/ in diffusers' save_pretrained format."""
    unet.save_pretrained(directory / "unet", safe_serialization=True)


def load_unet(unet: torch.nn.Module, directory: Path) -> None:
    """Exact fp32 weights from directory/unet/ into `unet`."""
    from safetensors.torch import load_file

    weights = load_file(str(directory / "unet" / "diffusion_pytorch_model.safetensors"),
                        device=str(next(unet.parameters()).device))
    unet.load_state_dict(weights, strict=True)


def save_checkpoint(output_dir: str | Path, epoch: int, engine, trainer_state: dict, keep_last: int,
                    save_model=save_unet) -> Path:
    """Write checkpoint `epoch` atomically (every rank takes part), then keep only the newest `keep_last`.
    save_model(unet, directory) writes the model part (the UNet, or LoRA adapters)."""
    root = checkpoint_root(output_dir)
    final = root / f"epoch_{epoch}"
    staging = root / f".epoch_{epoch}.partial"
    try:
        return _write_checkpoint(output_dir, staging, final, epoch, engine, trainer_state, keep_last, save_model)
    except (FastGRPOError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - a full disk surfaces as OSError, RuntimeError or a safetensors error
        if engine.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise FastGRPOError(f"saving checkpoint {final} failed ({type(error).__name__}: {reason}); the earlier "
                            "checkpoints are intact and the partial one was removed") from None


def _write_checkpoint(output_dir, staging: Path, final: Path, epoch: int, engine, trainer_state: dict,
                      keep_last: int, save_model) -> Path:
    if engine.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    engine.barrier()
    engine.save_state(staging)
    with engine.full_model() as unet:  # a checkpoint never holds NaN or inf, so keep_last never drops the last good one
        bad = [name for name, p in unet.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if engine.is_main and not bad:
            save_model(unet, staging)
    if bad:
        if engine.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise NonFiniteError(f"{len(bad)} trained UNet tensors hold NaN or inf (first: {bad[0]}); not saved")
    if engine.is_main:
        torch.save({**trainer_state, "epoch": epoch, "engine": engine.state_dict(), "rng": rng_state()},
                   staging / STATE_FILE)
        _replace_dir(staging, final)
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def _replace_dir(staging: Path, final: Path) -> None:
    if final.exists():
        stale = final.parent / f".{final.name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(staging, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staging, final)


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """'latest' -> the newest complete checkpoint of output_dir; otherwise `resume` must be a checkpoint directory."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FastGRPOError(f"run.resume=latest: no checkpoint under {checkpoint_root(output_dir)}")
        return found[-1][1]
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise FastGRPOError(f"run.resume: {resume!r} does not exist")
    if not is_complete(path):
        raise FastGRPOError(f"run.resume: {resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return path



def read_trainer_state(path: Path) -> dict:
    """The trainer state of checkpoint `path`, read without running any code it may carry: torch's weights_only
    unpickler builds tensors, numbers, strings and containers only. A file that holds anything else (a pickle that
    would call a function, say) or is damaged is refused with an error naming it."""
    file = path / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "not a trainer state"
        raise FastGRPOError(f"run.resume: {file} holds objects a fastgrpo checkpoint never does; refused without "
                            f"loading it ({reason[:160]})") from None
    except Exception as error:  # noqa: BLE001 - truncated zip, bad magic number, wrong format: one line
        raise FastGRPOError(f"run.resume: {file} is damaged or not a torch file ({type(error).__name__}: "
                            f"{str(error).strip().splitlines()[0][:160] if str(error).strip() else ''})") from None
    missing = [key for key in ("epoch", "global_step", "engine", "rng")
               if not isinstance(state, dict) or key not in state]
    if missing:
        raise FastGRPOError(f"run.resume: {file} is not a fastgrpo trainer state (missing {', '.join(missing)})")
    return state


# What DeepSpeed's own checkpoint files may name (DeepSpeed loads them with torch.load(weights_only=False), which would
# run any function a hostile file names): tensor rebuilders, storages, sizes, dtypes, OrderedDict, DeepSpeed's classes.
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
                 ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                 ("torch._utils", "_rebuild_tensor"), ("torch._tensor", "_rebuild_from_type_v2"),
                 ("torch.nn.parameter", "Parameter"), ("copyreg", "_reconstructor"), ("builtins", "object"),
                 ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


def pickle_globals(file: Path) -> set[tuple[str, str]]:
    """(module, name) of every global a torch file's pickle refers to, read without unpickling anything."""
    import pickletools
    import zipfile

    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    else:
        data = file.read_bytes()
    found, strings, memo = set(), [], {}
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(argument)
        elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
            memo[argument] = strings[-1]
        elif opcode.name == "MEMOIZE" and strings:
            memo[len(memo)] = strings[-1]
        elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and argument in memo:
            strings.append(memo[argument])
        elif opcode.name == "GLOBAL":
            found.add(tuple(argument.split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL":
            found.add(tuple(strings[-2:]) if len(strings) >= 2 else ("?", "?"))
    return found


def _is_safe_global(module: str, name: str) -> bool:
    if (module, name) in _SAFE_GLOBALS:
        return True
    if module == "torch":
        return name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)
    if module.startswith("deepspeed."):  # DeepSpeed's own data classes and enums, never its functions
        import importlib
        try:
            value = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return False
        return isinstance(value, type) and value.__module__.startswith("deepspeed.")  # not e.g. an imported Popen
    return False


def check_deepspeed_state(path: Path) -> None:
    """Refuse a checkpoint whose DeepSpeed files name anything but tensors, containers and DeepSpeed's classes."""
    for file in sorted((path / "deepspeed").rglob("*.pt")):
        try:
            named = pickle_globals(file)
        except Exception as error:  # noqa: BLE001 - a damaged file: one line
            raise FastGRPOError(f"run.resume: {file} is damaged ({type(error).__name__})") from None
        unsafe = sorted(f"{module}.{name}" for module, name in named if not _is_safe_global(module, name))
        if unsafe:
            raise FastGRPOError(f"run.resume: {file} refers to {', '.join(unsafe[:3])}, which a DeepSpeed checkpoint "
                                "never does; refused without loading it")


def load_checkpoint(path: Path, engine, load_model=load_unet, state: dict | None = None) -> dict:
    """Restore weights, optimiser and schedule through the engine; returns the trainer state (RNG states restored).
    load_model(unet, directory) reads the model part back (single process; DeepSpeed has its own copy). `state`:
    the trainer state already read with `read_trainer_state` (the trainer reads it before any model loads)."""
    state = read_trainer_state(path) if state is None else state
    engine.load_state(path, state, load_model)
    set_rng_state(state["rng"])
    return state
