"""Files from users are untrusted: loading a checkpoint never runs code, and a damaged one is a one-line error."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from fastgrpo.checkpoint import STATE_FILE, read_trainer_state
from fastgrpo.cli import main


class RunsCode:
    """Unpickling this calls os.system: what a hostile trainer_state.pt would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_checkpoint(root, marker, torch_format: bool):
    checkpoint = root / "checkpoints" / "epoch_0"
    (checkpoint / "unet").mkdir(parents=True)
    payload = {"epoch": 0, "global_step": 1, "engine": {}, "rng": RunsCode(marker)}
    if torch_format:
        torch.save(payload, checkpoint / STATE_FILE)
    else:
        with open(checkpoint / STATE_FILE, "wb") as handle:
            pickle.dump(payload, handle)
    return checkpoint


@pytest.mark.parametrize("torch_format", [True, False])
def test_resuming_a_hostile_checkpoint_runs_nothing(tiny_overrides, tmp_path, capsys, torch_format):
    marker = tmp_path / "code-ran"
    checkpoint = hostile_checkpoint(tmp_path / "shared", marker, torch_format)
    code = main(["train", "--config", "smoke", *tiny_overrides, f"run.resume={checkpoint}"])
    error = capsys.readouterr().err.strip()
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert code == 2 and len(error.splitlines()) == 1, error
    assert STATE_FILE in error and "refused" in error


def test_a_damaged_trainer_state_is_one_line(tiny_overrides, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoints" / "epoch_3"
    (checkpoint / "unet").mkdir(parents=True)
    (checkpoint / STATE_FILE).write_bytes(b"PK\x03\x04 truncated")
    code = main(["train", "--config", "smoke", *tiny_overrides, f"run.resume={checkpoint}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and "damaged" in error, error


def test_saved_trainer_state_reads_back_under_weights_only(tiny_overrides):
    """What the trainer writes (optimiser, schedule, every RNG's state) is all the safe loader accepts."""
    from fastgrpo.checkpoint import list_checkpoints
    from fastgrpo.config import load_config
    from fastgrpo.train import train

    output_dir = train(load_config("smoke", tiny_overrides + ["run.epochs=1"]))
    state = read_trainer_state(list_checkpoints(output_dir)[-1][1])
    assert state["epoch"] == 0 and state["engine"]["optimizer"]["state"]
    assert state["rng"]["numpy"][1].dtype == torch.int64
