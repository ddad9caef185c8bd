"""FLOPs of one guided UNet step and one VAE decode at a size, and this machine's matmul peak (runs in a torch venv).

FLOPs are counted by torch's FlopCounterMode (2 per multiply-add, matmuls and convolutions, the ops that carry
the cost) on a forward with meta tensors: shapes only, no weights, no time. Attention runs through diffusers'
plain AttnProcessor (baddbmm, softmax, bmm) so its matmuls are counted like any other; that is the same math
scaled-dot-product attention does. The peak is the best of repeated square matmuls on all cores, fp32 and bf16.

Usage: python flops.py MODEL_FOLDER SIZE  -> one JSON line on stdout
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from torch.utils.flop_counter import FlopCounterMode

GUIDED_BATCH = 2  # classifier-free guidance: the unconditional and conditional halves in one UNet call
SEQUENCE = 77
MATMUL_SIZE = 2048
PEAK_SECONDS = 2.0  # per precision


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(folder: Path, size: int) -> dict:
    """FLOPs of the UNet at batch 2 (a guided step) and of the VAE decoder at batch 1, for a size x size image."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        unet.set_attn_processor(AttnProcessor())
        vae.set_attn_processor(AttnProcessor())
        latent = size // 2 ** (len(vae.config.block_out_channels) - 1)
        sample = torch.zeros(GUIDED_BATCH, unet.config.in_channels, latent, latent)
        context = torch.zeros(GUIDED_BATCH, SEQUENCE, unet.config.cross_attention_dim)
        timestep = torch.zeros(GUIDED_BATCH)
        latents = torch.zeros(1, vae.config.latent_channels, latent, latent)
        with torch.no_grad():
            unet_flops = count_flops(lambda: unet(sample, timestep, context))
            vae_flops = count_flops(lambda: vae.decode(latents))
    return {"unet_step_flops": unet_flops, "vae_decode_flops": vae_flops, "unet_batch": GUIDED_BATCH,
            "latent_size": latent}


def matmul_peak(dtype: torch.dtype) -> float:
    """Best FLOP/s of an n x n matmul over PEAK_SECONDS of repetitions."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool, kernel selection
    best, deadline = float("inf"), time.perf_counter() + PEAK_SECONDS
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * MATMUL_SIZE**3 / best


def main() -> None:
    folder, size = Path(sys.argv[1]), int(sys.argv[2])
    result = model_flops(folder, size)
    result["matmul_peak_flops"] = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    result["matmul"] = {"size": MATMUL_SIZE, "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                        "library": f"torch {torch.__version__}"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
