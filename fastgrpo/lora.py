"""LoRA adapters on the UNet via peft: only the adapters train, the KL reference is the same UNet with adapters
disabled, and checkpoints hold the adapters in the format `StableDiffusionPipeline.load_lora_weights` reads."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

LORA_DIR = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet: torch.nn.Module, config) -> None:
    """Freeze the UNet and add trainable LoRA adapters (B = 0 at the start: the model is unchanged)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                target_modules=list(config.target_modules), init_lora_weights=True))


def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """The base UNet (the KL reference) for the duration."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def save_lora(unet: torch.nn.Module, directory: Path, *, export_merged: bool) -> None:
    """directory/lora/ for load_lora_weights; with export_merged also directory/unet/ with the adapters fused in."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # the adapter config (rank, alpha, targets) travels as metadata, so a loader applies the trained scale
    StableDiffusionPipeline.save_lora_weights(directory / LORA_DIR, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    if export_merged:
        merged = copy.deepcopy(unet)
        merged.fuse_lora()
        merged.unload_lora()
        merged.save_pretrained(directory / "unet", safe_serialization=True)


def load_lora(unet: torch.nn.Module, directory: Path) -> None:
    """Copy adapter weights saved by `save_lora` into the UNet's existing adapter parameters, in place (an
    optimiser built on those parameters keeps pointing at them)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(directory / LORA_DIR / LORA_FILE))
    saved = convert_unet_state_dict_to_peft({key.removeprefix("unet."): value for key, value in saved.items()})
    current = get_peft_model_state_dict(unet)  # views of the live parameters
    if saved.keys() != current.keys():
        missing = sorted(set(current) ^ set(saved))[0]
        raise ValueError(f"LoRA checkpoint {directory} does not match the configured adapters ({missing})")
    with torch.no_grad():
        for key, tensor in current.items():
            tensor.copy_(saved[key])
