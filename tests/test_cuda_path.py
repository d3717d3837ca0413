"""The CUDA path without a GPU: device placement under a launcher, collectives on the rank's device, and no host
syncs in the rollout, checked with mocks and fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and devices,
no data, so any read of a value on the host fails).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastgrpo import diffusion
from fastgrpo.devices import resolve_device
from fastgrpo.diffusion import DDIMSchedule, Guidance, RolloutSettings, sample_trajectories
from fastgrpo.errors import ConfigError
from fastgrpo.models import encode_prompts, load_diffusion_models

LAUNCHER_VARIABLES = ("LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices, as far as torch.cuda's queries go; records set_device calls."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return current


@pytest.mark.parametrize("setting", ["auto", "cuda"])
def test_each_launched_rank_takes_its_own_gpu(two_gpus, monkeypatch, setting):
    # the environment `deepspeed --num_gpus 2` gives its second process
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert resolve_device(setting) == torch.device("cuda", 1)
    assert two_gpus == [torch.device("cuda", 1)]  # made current: NCCL and Triton launch on the current device


def test_torchrun_local_world_size_is_read_too(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_device("auto") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="one GPU"):
        resolve_device("cuda:0")


def test_single_process_device_choice(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert two_gpus == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.parametrize("setting, message", [("cuda:2", "does not exist"), ("gpu", "must be"),
                                              ("cuda:x", "must be")])
def test_bad_device_settings_are_one_line_errors(two_gpus, setting, message):
    with pytest.raises(ConfigError, match=message):
        resolve_device(setting)


def test_launched_ranks_pinned_to_one_gpu_are_refused(two_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    with pytest.raises(ConfigError, match="one GPU"):
        resolve_device("cuda:0")


def test_cuda_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not available"):
        resolve_device("cuda")


# ------------------------------------------------------------------------------------------ collectives


class FakeCollectives:
    """Stands in for torch.distributed: records the device of every tensor handed to a collective, and answers
    all_gather with the per-rank rows given, on the host (so the caller can read them; 'meta' holds no values) or,
    with on_device, on the input's device."""

    def __init__(self, rows, on_device=False):
        self.rows, self.on_device, self.devices = rows, on_device, []

    def all_gather(self, outputs, tensor):
        self.devices.append(tensor.device)
        self.devices.extend(out.device for out in outputs)
        for rank, row in enumerate(self.rows):
            outputs[rank] = torch.as_tensor(row, dtype=tensor.dtype,
                                            device=tensor.device if self.on_device else "cpu")


def deepspeed_engine(device, world_size=2):
    from fastgrpo.engine_deepspeed import DeepSpeedEngine

    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # the collectives need no model or optimiser
    engine.device, engine.world_size, engine.rank, engine.is_main = device, world_size, 0, True
    return engine


def test_reduce_stats_hands_collectives_tensors_on_the_rank_device(monkeypatch):
    stats = [{"loss": 1.0, "ratio_min": 0.9, "ratio_max": 1.1}, {"loss": 3.0, "ratio_min": 0.8, "ratio_max": 1.3}]
    fake = FakeCollectives([[s[n] for n in sorted(s)] for s in stats])
    monkeypatch.setattr(torch.distributed, "all_gather", fake.all_gather)
    # 'meta' stands for the rank's GPU: any device but the host's shows a host tensor reaching the collective
    reduced = deepspeed_engine(torch.device("meta")).reduce_stats(stats[0])
    assert fake.devices and all(device == torch.device("meta") for device in fake.devices), fake.devices
    assert reduced == pytest.approx({"loss": 2.0, "ratio_min": 0.8, "ratio_max": 1.3})


def test_all_gather_refuses_a_tensor_off_the_rank_device():
    with pytest.raises(ValueError, match="communicates on meta"):
        deepspeed_engine(torch.device("meta")).all_gather(torch.zeros(3))


@pytest.mark.parametrize("what", ["rewards", "memory"])
def test_trainer_gathers_on_the_rank_device(monkeypatch, what):
    from fastgrpo import train

    fake = FakeCollectives([[0, 1], [2, 3]], on_device=what == "rewards")
    monkeypatch.setattr(torch.distributed, "all_gather", fake.all_gather)
    engine = deepspeed_engine(torch.device("meta"))
    engine.memory_report = lambda: {"param_bytes": 8, "grad_bytes": 4}
    session = types.SimpleNamespace(device=torch.device("meta"), engine=engine)
    if what == "rewards":  # sample ids come from the host plan; rewards from the reward model on the device
        gathered = train.gather_rewards(session, torch.tensor([0, 1]), torch.zeros(2, device="meta"), 4)
        assert gathered.shape == (4,)
    else:
        logged = []
        train.log_memory(session, 0, 0, types.SimpleNamespace(log=lambda record, kind: logged.append(record)))
        assert [(r["rank"], r["grad_bytes"], r["param_bytes"]) for r in logged] == [(0, 0, 1), (1, 2, 3)]
    assert fake.devices and all(device == torch.device("meta") for device in fake.devices), fake.devices


# ------------------------------------------------------------------------------------------ host syncs


class HostTraffic(TorchDispatchMode):
    """Records every op that reads a device value on the host or mixes host and device tensors (a copy either way).
    Ops on host tensors alone (the sample ids) are free."""

    SYNCS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default", "aten.equal.default",
             "aten.is_nonzero.default"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a.device for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o.device for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if str(func) in self.SYNCS or {"cpu", "cuda"} <= {d.type for d in inputs + outputs}:
            self.found.append(f"{func} {inputs} -> {outputs}")
        return out


def test_rollout_on_cuda_reads_nothing_back_to_the_host(tiny_pipeline_dir, monkeypatch):
    """A whole CFG rollout (noise, S denoising steps through the fused step op, VAE decode) on fake CUDA tensors:
    no op may read a device value on the host or move data between host and device."""
    models = load_diffusion_models(str(tiny_pipeline_dir), device=torch.device("cpu"))
    embeds, uncond = encode_prompts(models, ["a red apple", "a cat"]), encode_prompts(models, [""])
    host_schedule = DDIMSchedule.from_scheduler(models.scheduler, 3, torch.device("cpu"))
    seen_ids = []

    def fake_noise(seed, epoch, sample_ids, group_ids, num_steps, latent_shape, *, same_noise_per_group, device):
        seen_ids.append(sample_ids.device)  # CUDA generators cannot exist here; the ids must stay on the host
        return torch.randn((len(sample_ids), num_steps + 1, *latent_shape), device=device)

    monkeypatch.setattr(diffusion, "draw_noise", fake_noise)
    gpu = torch.device("cuda", 1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet, vae = models.unet.to(gpu), models.vae.to(gpu)
        schedule = DDIMSchedule(*(t.to(gpu) for t in (host_schedule.timesteps, host_schedule.alpha_prod_t,
                                                      host_schedule.alpha_prod_t_prev)))
        embeds, uncond = embeds.to(gpu), uncond.to(gpu)
        sample_prompt = torch.tensor([0, 0, 1, 1]).to(gpu)
        settings = RolloutSettings(models.latent_shape(None), 2, 2, False, 0)
        with HostTraffic() as traffic:
            result = sample_trajectories(unet, vae, schedule, embeds, uncond, sample_prompt, torch.arange(4),
                                         Guidance(1.0, 5.0, models.prediction_type), settings, epoch=0)
    assert result.latents.device == gpu and result.log_probs.shape == (4, 3)
    assert seen_ids == [torch.device("cpu")] * 2
    assert not traffic.found, "\n".join(traffic.found[:10])


def test_noise_refuses_sample_ids_on_the_device():
    with FakeTensorMode(allow_non_fake_inputs=True):
        ids = torch.arange(4).to("cuda")
        with pytest.raises(ValueError, match="must be CPU tensors"):
            diffusion.draw_noise(0, 0, ids, ids // 2, 2, (4, 8, 8), same_noise_per_group=False, device="cuda")


def test_triton_launches_make_the_tensors_device_current(monkeypatch):
    """Triton launches on the current device: a call with tensors on cuda:1 while cuda:0 is current must switch."""
    from fastgrpo_kernels import step_logprob as kernels

    current = [0]

    @contextlib.contextmanager
    def device(target):
        previous, current[0] = current[0], torch.device(target).index
        yield
        current[0] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    launched_on = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched_on.append(current[0])

    for target in ("cuda:1", "cuda:0", "cpu"):
        kernels.launch(Kernel(), (1,), torch.device(target))
    assert launched_on == [1, 0, 0] and current == [0]


def test_info_on_a_gpu_machine_picks_triton_for_cuda_tensors(monkeypatch):
    from fastgrpo.info import backend_table

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    table = backend_table()
    for op in ("ddim_logprob", "ddim_step", "group_advantages", "grpo_loss"):
        assert f"{op:<17} cuda  -> triton" in table and f"{op:<17} cpu   -> cpp" in table
