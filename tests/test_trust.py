"""Files from users are untrusted: loading a checkpoint never runs code, and a damaged one is a one-line error."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

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


@pytest.mark.parametrize("global_name", ["os.system", "deepspeed.launcher.runner.defaultdict"])
def test_a_deepspeed_checkpoint_naming_a_function_is_refused(tiny_overrides, tmp_path, capsys, global_name):
    """DeepSpeed loads its own files with weights_only=False: they are scanned (never unpickled) first. DeepSpeed's
    own classes pass; a function, or a class that a DeepSpeed module merely imports, does not."""
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "checkpoints" / "epoch_0"
    (checkpoint / "unet").mkdir(parents=True)
    torch.save({"epoch": 0, "global_step": 1, "engine": {}, "rng": {}}, checkpoint / STATE_FILE)
    (checkpoint / "deepspeed" / "state").mkdir(parents=True)
    target = checkpoint / "deepspeed" / "state" / "zero_pp_rank_0_optim.pt"
    if global_name == "os.system":
        torch.save({"optimizer_state_dict": RunsCode(marker)}, target)
    else:  # a raw pickle naming collections.defaultdict through the DeepSpeed module that imports it
        target.write_bytes(b"\x80\x02cdeepspeed.launcher.runner\ndefaultdict\nq\x00.")
    code = main(["train", "--config", "smoke", *tiny_overrides, "engine.deepspeed=zero2", f"run.resume={checkpoint}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert code == 2 and len(error) == 1 and "refused without loading it" in error[0], error


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


# ------------------------------------------------------------------------------------------ non-finite values


def nan_after_first_epoch_run(tiny_overrides, extra=()):
    """The drill's command: a learning rate whose first update (the one step of epoch 0) drives the next losses to
    NaN."""
    return main(["train", "--config", "smoke", *tiny_overrides, "sample.num_steps=4", "run.epochs=3",
                 "run.save_every=1", "run.keep_last=2", "train.learning_rate=1e3", "train.samples_per_step=8",
                 *extra])


def all_finite(checkpoint) -> bool:
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))
    return all(bool(torch.isfinite(t).all()) for t in weights.values())


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_finite_checkpoint(tiny_overrides, capsys):
    from fastgrpo.checkpoint import list_checkpoints

    output_dir = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("run.output_dir="))
    code = nan_after_first_epoch_run(tiny_overrides)
    error = capsys.readouterr().err.strip().splitlines()
    # the huge weights of the first update make epoch 1's images, hence rewards, NaN
    assert code == 2 and len(error) == 1 and "epoch 1: 8 of 8 rewards are not finite" in error[0], error
    assert "epoch_0" in error[0]  # names the checkpoint to go back to
    saved = list_checkpoints(output_dir)
    assert [epoch for epoch, _ in saved] == [0] and all_finite(saved[0][1]), "the last finite checkpoint is gone"
    assert not list((Path(output_dir) / "checkpoints").glob(".*partial"))


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))


def one_step(make_log_probs, skip):
    """policy_update over one optimiser step of 4 samples whose log-probs come from make_log_probs(weight)."""
    from fastgrpo.config import TrainConfig
    from fastgrpo.engine import SingleProcessEngine
    from fastgrpo.grpo import LossSettings, UpdatePlan, ddpo_loss_fn, policy_update

    model = Linear()
    engine = SingleProcessEngine(model, TrainConfig(learning_rate=0.1))
    plan = UpdatePlan(torch.arange(4), torch.zeros(4, 1, dtype=torch.long))
    policy_fn = lambda samples, steps: (make_log_probs(model.weight)[samples], None)  # noqa: E731
    loss_fn = ddpo_loss_fn(policy_fn, None, torch.zeros(4, 1), torch.tensor([1.0, -1.0, 0.5, -0.5]),
                           LossSettings(0.2))
    stats = list(policy_update(engine, loss_fn, plan, batch_size=4, samples_per_step=4, skip_nonfinite=skip))
    return model, engine, stats


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nonfinite_step_is_never_applied(kind):
    from fastgrpo.errors import NonFiniteError

    if kind == "loss":
        make = lambda w: torch.cat([w * float("nan"), w[:1]])  # noqa: E731
    else:  # a finite loss whose gradient is infinite: d sqrt(x)/dx at 0
        make = lambda w: torch.cat([torch.sqrt(w - w.detach()), w[:1] * 0])  # noqa: E731
    with pytest.raises(NonFiniteError, match="not applied"):
        one_step(make, skip=False)
    model, engine, stats = one_step(make, skip=True)
    assert stats[0]["skipped"] is True
    assert torch.equal(model.weight.detach(), torch.ones(3)) and not engine.optimizer.state
    assert model.weight.grad is None


# ------------------------------------------------------------------------------------------ the run directory


def output_dir_of(overrides) -> Path:
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir=")))


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_without_asking(tiny_overrides, capsys):
    from fastgrpo.checkpoint import list_checkpoints

    overrides = tiny_overrides + ["run.save_every=1", "run.keep_last=5"]
    assert main(["train", "--config", "smoke", *overrides, "run.epochs=3"]) == 0
    output_dir = output_dir_of(overrides)
    before = {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--config", "smoke", *overrides, "run.epochs=1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds another run" in error[0] and "run.overwrite=true" in error[0], error
    assert {p: p.read_bytes() for p in output_dir.rglob("*") if p.is_file()} == before  # untouched
    # replacing it on purpose leaves nothing of the old run (no old epoch_2 to resume from by mistake)
    assert main(["train", "--config", "smoke", *overrides, "run.epochs=1", "run.overwrite=true"]) == 0
    assert [epoch for epoch, _ in list_checkpoints(output_dir)] == [0]
    assert len((output_dir / "metrics.jsonl").read_text().splitlines()) < len(before[output_dir / "metrics.jsonl"]
                                                                               .decode().splitlines())
    assert not (output_dir / ".fastgrpo.lock").exists()


def test_a_run_directory_in_use_is_refused(tmp_path):
    import json
    import socket

    from fastgrpo.errors import ConfigError
    from fastgrpo.rundir import LOCK_FILE, claim_run_dir

    with claim_run_dir(tmp_path / "run", resume=None, overwrite=False):
        lock = tmp_path / "run" / LOCK_FILE
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
            with claim_run_dir(tmp_path / "run", resume="latest", overwrite=False):
                pass
        assert lock.exists()  # the refused claim left the holder's lock alone
    assert not lock.exists()
    # a lock whose process is gone is taken over
    (tmp_path / "run").mkdir(exist_ok=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345}))
    with claim_run_dir(tmp_path / "run", resume=None, overwrite=False):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_an_output_dir_that_is_a_file_fails_before_models_load(tiny_overrides, tmp_path, capsys, monkeypatch):
    import fastgrpo.train as train_module

    monkeypatch.setattr(train_module, "load_diffusion_models", lambda *a, **k: pytest.fail("models loaded"))
    target = tmp_path / "a-file"
    target.write_text("not a directory")
    assert main(["train", "--config", "smoke", *tiny_overrides, f"run.output_dir={target}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is not a directory" in error[0], error


# ------------------------------------------------------------------------------------------ exact resume


def run_args(output_dir, *extra):
    return ["train", "--config", "smoke", "sample.num_steps=4", "train.samples_per_step=8", "run.epochs=4",
            "run.save_every=1", "run.keep_last=5", "run.progress=false", "run.tensorboard=false",
            "run.num_sample_images=0", f"run.output_dir={output_dir}", *extra]


def final_weights(output_dir):
    from safetensors.torch import load_file

    from fastgrpo.checkpoint import list_checkpoints

    epoch, path = list_checkpoints(output_dir)[-1]
    return epoch, load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def training_lines(output_dir):
    import json

    lines = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    timing = ("rollout_s", "reward_s", "train_s")
    return [{k: v for k, v in line.items() if k not in timing} for line in lines]


def _epoch_lines(output_dir):
    import json

    metrics = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


KILL_MOMENTS = {  # when to kill -9, judged from what the run has written so far
    "rollout": lambda out: any("rollout_s" in r and r["epoch"] == 1 for r in _epoch_lines(out))
    and (out / "checkpoints" / "epoch_1" / STATE_FILE).exists(),
    "training": lambda out: any("loss" in r and r["epoch"] == 2 for r in _epoch_lines(out)),
    "saving": lambda out: (out / "checkpoints" / ".epoch_1.partial").exists(),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(run_args(output_dir)) == 0
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_resume_after_kill_9_is_bitwise_equal_to_the_uninterrupted_run(uninterrupted, tmp_path, moment):
    """kill -9 at a chosen moment (epoch 2's rollout, epoch 2's training after its first optimiser step, or in the
    middle of writing checkpoint 1), then run.resume=latest: the last checkpoint's weights and every logged value
    equal those of a run that was never interrupted (CPU)."""
    import signal
    import subprocess
    import sys
    import time

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "fastgrpo.cli", *run_args(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while process.poll() is None and time.time() < deadline:
        if KILL_MOMENTS[moment](killed):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, f"the run ended before it could be killed ({moment})"
    assert final_weights(killed)[0] < 3  # the run was cut short
    assert main(run_args(killed, "run.resume=latest")) == 0
    (epoch_a, a), (epoch_b, b) = final_weights(uninterrupted), final_weights(killed)
    assert epoch_a == epoch_b == 3 and a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} of {len(a)} UNet tensors differ after resuming"
    assert training_lines(uninterrupted) == training_lines(killed)
    assert not [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("value", [0.7, 0.1, -3.3, 1e-3])
def test_a_group_of_equal_rewards_gets_zero_advantage(backend, value):
    from fastgrpo import ops

    rewards = torch.cat([torch.full((8,), value), torch.linspace(0, 1, 8)])
    advantages = ops.group_advantages(rewards, 8, backend=backend)
    assert torch.equal(advantages[:8], torch.zeros(8)), advantages[:8]


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(tiny_overrides, monkeypatch, capsys):
    import errno

    import fastgrpo.checkpoint as checkpoint
    from fastgrpo.checkpoint import list_checkpoints

    real_save, calls = torch.save, {"n": 0}

    def save_on_a_full_disk(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's trainer state runs out of space half-way
            Path(path).write_bytes(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_on_a_full_disk)
    code = main(["train", "--config", "smoke", *tiny_overrides, "run.save_every=1", "run.epochs=3"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "No space left on device" in error[0], error
    output_dir = output_dir_of(tiny_overrides)
    assert [epoch for epoch, _ in list_checkpoints(output_dir)] == [0]
    assert not [p.name for p in (output_dir / "checkpoints").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------ one-line errors


def test_a_corrupt_model_index_is_one_line(tiny_overrides, tiny_pipeline_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken-pipeline"
    shutil.copytree(tiny_pipeline_dir, broken)
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ', encoding="utf-8")
    assert main(["train", "--config", "smoke", *tiny_overrides, f"model.pretrained={broken}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "model_index.json is not valid JSON" in error[0], error


def test_a_directory_given_as_prompt_file_says_so(tiny_overrides, tmp_path, capsys):
    assert main(["train", "--config", "smoke", *tiny_overrides, f"data.safe_prompts={tmp_path}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is a directory" in error[0], error


def test_prompts_past_the_token_limit_are_noted(tiny_overrides, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text("a red apple\n" + "a very " * 60 + "long prompt\n", encoding="utf-8")
    assert main(["train", "--config", "smoke", *tiny_overrides, f"data.safe_prompts={long}", "run.epochs=1"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "truncated" in line]
    assert len(notes) == 1 and "1 of 5 prompts are longer than the text encoder's 77 tokens" in notes[0], notes


@pytest.mark.parametrize("saved_first", [False, True])
def test_ctrl_c_says_which_checkpoint_a_resume_starts_from(tiny_overrides, monkeypatch, capsys, saved_first):
    import fastgrpo.train as train_module

    real_run_epoch, calls = train_module.run_epoch, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == (2 if saved_first else 1):
            raise KeyboardInterrupt
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", interrupted)
    assert main(["train", "--config", "smoke", *tiny_overrides, "run.save_every=1"]) == 130
    error = capsys.readouterr().err.strip().splitlines()
    expected = "the newest checkpoint is" if saved_first else "no checkpoint had been saved yet"
    assert len(error) == 1 and expected in error[0], error
    assert not (output_dir_of(tiny_overrides) / ".fastgrpo.lock").exists()


def test_group_kind_stats_against_a_hand_computed_case():
    from fastgrpo.grpo import group_kind_stats

    rewards = torch.tensor([1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.5, 0.5])     # groups of 2: unsafe, unsafe, safe, safe
    advantages = torch.tensor([0.0, 0.0, -0.7, 0.7, 0.0, 0.0, 0.0, 0.0])
    is_unsafe = torch.tensor([True] * 4 + [False] * 4)
    stats = group_kind_stats(rewards, advantages, is_unsafe, 2)
    assert stats["reward_group_std_unsafe"] == pytest.approx((0 + 2 ** 0.5) / 2)
    assert stats["advantage_abs_unsafe"] == pytest.approx(0.35) and stats["advantage_abs_safe"] == 0
    assert stats["reward_group_std_safe"] == 0
    only_safe = group_kind_stats(rewards[4:], advantages[4:], is_unsafe[4:], 2)
    assert only_safe["reward_group_std_unsafe"] is None and only_safe["advantage_abs_unsafe"] is None


def test_zero_safe_advantages_leave_a_safe_only_run_untouched(tiny_overrides):
    """train.safe_advantages=zero with no KL: safe prompts' samples carry no gradient, so on safe prompts alone
    (and no weight decay) the UNet stays the base model; the default 'group' moves it."""
    from safetensors.torch import load_file

    from fastgrpo.checkpoint import list_checkpoints
    from fastgrpo.config import load_config
    from fastgrpo.train import train

    base = next(o.split("=", 1)[1] for o in tiny_overrides if o.startswith("model.pretrained="))
    base_weights = load_file(str(Path(base) / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = {}
    for mode in ("zero", "group"):
        overrides = [o for o in tiny_overrides if not o.startswith("run.output_dir=")]
        output_dir = train(load_config("smoke", overrides + [
            "data.unsafe_fraction=0", "run.epochs=1", "train.weight_decay=0", f"train.safe_advantages={mode}",
            f"run.output_dir={output_dir_of(tiny_overrides).parent / mode}"]))
        trained = load_file(str(list_checkpoints(output_dir)[-1][1] / "unet" / "diffusion_pytorch_model.safetensors"))
        changed[mode] = sum(not torch.equal(trained[k], base_weights[k]) for k in base_weights)
    assert changed["zero"] == 0 and changed["group"] > 0, changed
