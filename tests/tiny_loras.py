"""Tiny random LoRA files for the tiny SD1 model, in each format sdrt reads (torch side: test helpers only).

Every Linear and Conv2d a LoRA trainer targets gets a rank-RANK change; convolutions with a kernel get LoCon factors
(a kxk down, a 1x1 up). Values are seeded and sized so the change is visible in a tiny model's image.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

RANK, ALPHA = 4, 2.0
# The modules LCM-LoRA (diffusers' train_lcm_distill_lora_sd_wds.py) and kohya's LoCon target in the UNet, and
# kohya's text-encoder targets.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def targets(model: nn.Module, suffixes: tuple[str, ...]) -> dict[str, nn.Module]:
    """The model's Linear and Conv2d modules whose names end in one of `suffixes`."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name.endswith(suffixes)}


def factors(module: nn.Module, generator: torch.Generator, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for one module: LoCon shapes for convolutions, sized so up @ down is about 0.6x the weight."""
    weight = module.weight
    fan_in = weight[0].numel()
    if weight.ndim == 4:
        down = torch.randn(rank, *weight.shape[1:], generator=generator) / fan_in**0.5
        up = torch.randn(weight.shape[0], rank, 1, 1, generator=generator) * 1.2 / rank**0.5
    else:
        down = torch.randn(rank, weight.shape[1], generator=generator) / fan_in**0.5
        up = torch.randn(weight.shape[0], rank, generator=generator) * 1.2 / rank**0.5
    return down * weight.abs().mean() * fan_in**0.5, up


def kohya_state_dict(unet: nn.Module, text_encoder: nn.Module, seed: int = 0, text: bool = True) -> dict:
    """A kohya / A1111 LoRA (LoCon for kxk convolutions): lora_unet_* and lora_te_text_model_* keys with alphas."""
    generator = torch.Generator().manual_seed(seed)
    parts = [("lora_unet_", targets(unet, UNET_TARGETS))]
    if text:
        parts.append(("lora_te_text_model_", targets(text_encoder, TEXT_TARGETS)))
    state = {}
    for prefix, modules in parts:
        for name, module in modules.items():
            key = prefix + name.removeprefix("text_model.").replace(".", "_")
            down, up = factors(module, generator)
            state[f"{key}.lora_down.weight"] = down.half()
            state[f"{key}.lora_up.weight"] = up.half()
            state[f"{key}.alpha"] = torch.tensor(ALPHA)
    return state


def peft_state_dict(unet: nn.Module, text_encoder: nn.Module, seed: int = 0) -> tuple[dict, dict]:
    """A diffusers / PEFT LoRA (unet.*.lora_A / lora_B keys, no alphas) and the lora_adapter_metadata saying
    lora_alpha, as diffusers' save_lora_weights writes it."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, modules in (("unet.", targets(unet, UNET_TARGETS)), ("text_encoder.", targets(text_encoder,
                                                                                                TEXT_TARGETS))):
        for name, module in modules.items():
            down, up = factors(module, generator)
            state[f"{prefix}{name}.lora_A.weight"] = down
            state[f"{prefix}{name}.lora_B.weight"] = up
    metadata = {f"{c}.{k}": v for c, names in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS))
                for k, v in _lora_config(names).items()}
    return state, {"lora_adapter_metadata": json.dumps(metadata), "format": "pt"}


def _lora_config(names: tuple[str, ...]) -> dict:
    """PEFT's LoraConfig as diffusers' save_lora_weights records it (sets as lists)."""
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(names)).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save(state: dict, path: Path, metadata: dict | None = None) -> Path:
    """Write `state` as .safetensors, or with torch.save for any other suffix."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    else:
        torch.save(state, path)
    return path
