"""Distil a tiny decoder (diffusers AutoencoderTiny, TAESD's design) from a trained model's VAE decoder, on CPU.

    python -m training.train_taesd models/sdrt-shapes [--steps 1500] [--minutes 6]

The student learns to reproduce the teacher VAE's decoding of the model's own latents (posterior samples of
training images, on the UNet's scale, plus jittered copies for the in-between latents previews see mid-loop).
It is written as `<model>/taesd/`, where `sdrt export` finds it (sdrt.export.taesd); only the decoder is trained,
the saved encoder keeps its random initialisation and is not exported.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see training/train.py  # ruff: noqa: E402

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny

from training.shapes import make_dataset
from training.train import Stage, learning_rate, seeded, to_tensor

log = logging.getLogger("training.train_taesd")

# Narrower and shallower than TAESD's (64 channels, 3 blocks per level): the teacher here is itself a small VAE.
STUDENT = dict(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
               num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 2, 2, 1))
LATENT_JITTER = 0.3  # std of the noise added to half the latents (UNet scale, unit variance)
HELD_OUT_SEED_OFFSET = 2000


def teacher_pairs(vae: AutoencoderKL, images: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet-scale latents, the teacher's images for them): posterior samples, half of them jittered."""
    generator = torch.Generator().manual_seed(seed)
    scale = vae.config.scaling_factor
    with torch.no_grad():
        posterior = vae.encode(to_tensor(images)).latent_dist
        latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)) * scale
        jitter = torch.randn(latents.shape, generator=generator) * LATENT_JITTER
        latents[::2] += jitter[::2]
        targets = torch.cat([vae.decode(chunk / scale).sample for chunk in latents.split(256)])
    return latents, targets


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)).item()
    return float(10 * np.log10(4.0 / mse))


def train(student: AutoencoderTiny, latents: torch.Tensor, targets: torch.Tensor, stage: Stage, seed: int) -> dict:
    """L1 + MSE against the teacher's images; stops at `stage.steps` or its time budget."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.decoder.parameters(), lr=stage.lr, weight_decay=0.0)
    start, step, smoothed = time.monotonic(), 0, None
    student.train()
    while step < stage.steps and time.monotonic() - start < stage.minutes * 60:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(stage, step)
        index = torch.randint(0, len(latents), (stage.batch,), generator=generator)
        out = student.decoder(latents[index])
        loss = F.l1_loss(out, targets[index]) + F.mse_loss(out, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        step += 1
        if step % 100 == 0:
            log.info("step %d loss %.4f", step, smoothed)
    student.eval()
    return {"steps": step, "seconds": round(time.monotonic() - start, 1), "final_loss": smoothed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="diffusers folder of the trained model (its vae/ is the teacher)")
    parser.add_argument("--out", type=Path, help="default: MODEL/taesd")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").eval()
    latents, targets = teacher_pairs(vae, make_dataset(args.images, args.seed)[0], args.seed)
    held_latents, held_targets = teacher_pairs(vae, make_dataset(300, args.seed + HELD_OUT_SEED_OFFSET)[0], args.seed)
    student = seeded(args.seed, lambda: AutoencoderTiny(latent_channels=vae.config.latent_channels, **STUDENT))
    report = train(student, latents, targets, Stage("taesd", args.steps, args.batch, args.lr, args.minutes), args.seed)
    with torch.no_grad():
        report["held_out_psnr_db"] = psnr(student.decoder(held_latents), held_targets)
    out = args.out or args.model / "taesd"
    student.save_pretrained(out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
