"""A run's output directory: claimed by one training process at a time, and never silently reused by another run.

`claim_run_dir` runs before any model loads. A directory that already holds a run (config.yaml, metrics.jsonl or
checkpoints/) is refused unless the new run resumes it (`run.resume`) or replaces it (`run.overwrite=true`, which
removes the old run's files once the directory is claimed). The claim is a lock file created atomically
(O_CREAT | O_EXCL) holding the owner's host and pid; a lock whose process is gone (same host, pid not alive) is
taken over. Under a distributed launcher only rank 0 claims: the launcher stops the other ranks when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path

from fastgrpo.errors import ConfigError

LOCK_FILE = ".fastgrpo.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "samples", "tb")


def held_run_files(output_dir: Path) -> list[str]:
    """The files and folders of a run that `output_dir` already holds."""
    return [name for name in RUN_FILES[:3] if (output_dir / name).exists()]


def _owner_alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: it cannot be checked from here
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _take_lock(lock: Path) -> None:
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                owner = {}
            if _owner_alive(owner):
                raise ConfigError(f"run.output_dir {lock.parent} is in use by process {owner.get('pid', '?')} on "
                                  f"{owner.get('host', '?')} (if that process is gone, remove {lock})") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, handle)
        return
    raise ConfigError(f"run.output_dir {lock.parent}: could not take {lock}")


@contextlib.contextmanager
def claim_run_dir(output_dir: str | Path, *, resume: str | None, overwrite: bool, main_process: bool = True):
    """Hold `output_dir` for one run for the duration; ConfigError (one line) when it cannot be."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir {output_dir} exists and is not a directory")
    if not main_process:
        yield output_dir
        return
    held = held_run_files(output_dir)
    if held and not resume and not overwrite:
        raise ConfigError(f"run.output_dir {output_dir} holds another run ({', '.join(held)}); resume it with "
                          "run.resume=latest, choose another run.output_dir, or replace it with run.overwrite=true")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"run.output_dir {output_dir} cannot be created ({error.strerror})") from None
    lock = output_dir / LOCK_FILE
    _take_lock(lock)
    try:
        if held and overwrite and not resume:
            for name in RUN_FILES:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        yield output_dir
    finally:
        lock.unlink(missing_ok=True)
