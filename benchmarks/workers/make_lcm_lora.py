"""Write a random LoRA with LCM-LoRA's layout for the source model's UNet (runs in the development venv).

latent-consistency/lcm-lora-sdv1-5 was trained by diffusers' train_lcm_distill_lora_sd_wds.py: rank 64 on the
attention projections, the transformer blocks' proj_in / proj_out and feed-forward layers, and the ResNet
convolutions, shortcut, time projection and resampling convolutions (its default --lora_target_modules); 67.5 M
parameters on SD 1.5. Written in kohya's key layout (lora_unet_*, with alphas), fp16, into the folder OUT as
`pytorch_lora_weights.safetensors`: the LCM-LoRA's file name, whose folder name (lcm-lora) says LCM to sdrt.
The values are random and small: applying it costs what the real one costs; the images mean nothing.

Usage: python make_lcm_lora.py SOURCE OUT [--rank 64]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
RANK, SEED, STD = 64, 0, 1e-3
FILE = "pytorch_lora_weights.safetensors"


def lora_state(unet: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    generator, state = torch.Generator().manual_seed(SEED), {}
    for name, module in unet.named_modules():
        if not (isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith(TARGETS)):
            continue
        key, shape = "lora_unet_" + name.replace(".", "_"), module.weight.shape
        r = min(rank, shape[0], shape[1])
        kernel = shape[2:] if len(shape) == 4 else ()
        state[f"{key}.lora_down.weight"] = (torch.randn(r, shape[1], *kernel, generator=generator) * STD).half()
        up_kernel = (1, 1) if kernel else ()
        state[f"{key}.lora_up.weight"] = (torch.randn(shape[0], r, *up_kernel, generator=generator) * STD).half()
        state[f"{key}.alpha"] = torch.tensor(float(r)).half()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int, default=RANK)
    args = parser.parse_args()
    with torch.device("meta"):  # shapes only: no weights read or allocated
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(args.source / "unet"))
    with torch.device("cpu"):
        state = lora_state(unet, args.rank)
    args.out.mkdir(parents=True)
    save_file(state, str(args.out / FILE), metadata={"format": "pt"})
    params = sum(v.numel() for k, v in state.items() if not k.endswith(".alpha"))
    print(json.dumps({"modules": len(state) // 3, "parameters": params, "rank": args.rank}))


if __name__ == "__main__":
    main()
