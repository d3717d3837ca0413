"""Shared fixtures: tiny random models saved in the real on-disk formats, and a tiny training config."""

from __future__ import annotations

import os

# The kernel tests run on CPU tensors (Triton through its interpreter) unless FASTGRPO_TEST_DEVICE=cuda, which the
# device check (bench/device_check.sh) sets to run the same cases on a GPU with compiled kernels.
TEST_DEVICE_NAME = os.environ.get("FASTGRPO_TEST_DEVICE", "cpu")
if TEST_DEVICE_NAME == "cpu":
    # must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastgrpo.tiny import build_tiny_clip, build_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
TEST_DEVICE = torch.device(TEST_DEVICE_NAME)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep builtin models built by tests out of the user's cache."""
    os.environ["FASTGRPO_CACHE"] = str(tmp_path_factory.mktemp("fastgrpo-cache"))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline", seed=0)


@pytest.fixture(scope="session")
def tiny_clip_files(tmp_path_factory) -> tuple[Path, Path]:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    safe, unsafe = root / "safe.txt", root / "unsafe.csv"
    safe.write_text("a red apple\na blue car\na green tree\na cat on a sofa\n", encoding="utf-8")
    unsafe.write_text("id,prompt\n1,a naked person\n2,a violent fight\n3,a bloody scene\n", encoding="utf-8")
    return safe, unsafe


@pytest.fixture
def tiny_overrides(tiny_pipeline_dir, tiny_clip_files, prompt_files, tmp_path) -> list[str]:
    """key=value overrides for a run of a few seconds on the tiny models."""
    clip_config, clip_checkpoint = tiny_clip_files
    safe, unsafe = prompt_files
    return [
        f"model.pretrained={tiny_pipeline_dir}", f"reward.clip_model={clip_config}",
        f"reward.clip_checkpoint={clip_checkpoint}", f"data.safe_prompts={safe}", f"data.unsafe_prompts={unsafe}",
        "sample.num_steps=4", "sample.group_size=4", "sample.prompts_per_epoch=2", "sample.batch_size=4",
        "train.batch_size=2", "train.samples_per_step=4", "train.learning_rate=1e-3", "train.clip_range=1e-2",
        "run.epochs=2", "run.progress=false", "run.tensorboard=false", "run.num_sample_images=4",
        f"run.output_dir={tmp_path / 'run'}",
    ]


def assert_compiled_gradients_match(step_loss, tensors) -> None:
    """torch.compile(step_loss, fullgraph=True) gives the same input gradients as eager, and they are not zero."""
    compiled = torch.compile(step_loss, fullgraph=True)
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    expected_inputs = [t.clone().requires_grad_(True) for t in tensors]
    compiled(*inputs).backward()
    step_loss(*expected_inputs).backward()
    for got, expected in zip(inputs, expected_inputs):
        torch.testing.assert_close(got.grad, expected.grad)
    assert float(expected_inputs[0].grad.abs().sum()) > 0


def assert_same_under_thread_counts(run) -> None:
    """run() -> a tuple of tensors; it must give bitwise equal results on 1 and on 2 threads."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)
