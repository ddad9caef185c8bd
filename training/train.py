"""Train sdrt-shapes on CPU: stage 1 the VAE, stage 2 the UNet and text encoder; writes a diffusers folder.

    python -m training.train --out models/sdrt-shapes --seed 0 [--resume]

Each stage runs a fixed number of steps (so a seed gives the same weights) and stops early only when its
`--minutes` budget runs out; checkpoints in `--work-dir` let an interrupted run continue with `--resume`.
"""

from __future__ import annotations

import os

# On a shared, oversubscribed CPU, OpenMP's default spin-waiting made 2 torch threads ~10x slower here
# (10 s vs 0.8 s per VAE step); passive waiting has to be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # ruff: noqa: E402 (imports below must follow it)

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from tqdm import tqdm

from training import architecture
from training.shapes import classify, make_dataset

log = logging.getLogger("training.train")

KL_WEIGHT = 1e-7  # on the per-sample KL sum against per-pixel L1+MSE: keeps latents bounded, edges sharp
EMPTY_CAPTION_RATE = 0.1  # captions dropped to "" so classifier-free guidance has an unconditional model
MIN_SNR_GAMMA = 5.0  # Min-SNR-5 loss weighting (Hang et al. 2023): faster convergence for eps-prediction
# Offset noise (Guttenberg, crosslabs.org 2023): a per-channel constant added to the training noise. SD's
# schedule keeps sqrt(alpha_bar_T) = 0.068 of the signal at t=T; on an 8x8 latent the per-channel mean of
# pure noise is only N(0, 1/8^2), so without this the model reads the background colour from the initial
# noise (measured: every prompt of one seed got the same background) instead of from the caption.
OFFSET_NOISE = 0.5
EMA_DECAY = 0.998
WARMUP_STEPS = 100
FINAL_LR_FRACTION = 0.1  # cosine decay ends at this fraction of the peak learning rate
CHECKPOINT_SECONDS = 60.0
HELD_OUT_SEED_OFFSET = 1000  # held-out images for the VAE check come from seed + this
HELD_OUT_IMAGES = 300


@dataclass(frozen=True)
class Stage:
    """One training stage's length, batch and optimiser settings."""

    name: str
    steps: int
    batch: int
    lr: float
    minutes: float


# ---------------------------------------------------------------- shared loop pieces


def learning_rate(stage: Stage, step: int) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    if step < WARMUP_STEPS:
        return stage.lr * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(stage.steps - WARMUP_STEPS, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return stage.lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)


def seeded(seed: int, build):
    """Call `build()` with torch's global RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    """Exponential moving average of the weights, with the usual (1 + t) / (10 + t) warm-up."""
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    with torch.no_grad():
        for averaged, current in zip(ema.parameters(), model.parameters()):
            averaged.lerp_(current, 1 - decay)


class Checkpoint:
    """A stage's resumable state: a dict of state_dicts plus step, elapsed seconds and RNG state."""

    def __init__(self, path: Path):
        self.path = path
        self.last_save = time.monotonic()

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        log.info("resuming from %s", self.path)
        return torch.load(self.path, weights_only=False)

    def due(self) -> bool:
        return time.monotonic() - self.last_save >= CHECKPOINT_SECONDS

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)  # atomic: an interrupted save never leaves a torn checkpoint
        self.last_save = time.monotonic()


def run_stage(stage: Stage, modules: dict, step_fn, checkpoint: Checkpoint, generator: torch.Generator) -> dict:
    """Run `step_fn(step) -> loss` until `stage.steps` or the time budget; returns the stage report."""
    state = checkpoint.load() or {}
    for key, module in modules.items():
        if key in state:
            module.load_state_dict(state[key])
    if "generator" in state:
        generator.set_state(state["generator"])
    step, elapsed = state.get("step", 0), state.get("elapsed", 0.0)
    start, smoothed = time.monotonic() - elapsed, None

    def snapshot() -> dict:
        states = {key: module.state_dict() for key, module in modules.items()}
        return {**states, "step": step, "elapsed": time.monotonic() - start, "generator": generator.get_state()}

    bar = tqdm(total=stage.steps, initial=step, desc=stage.name, unit="step", dynamic_ncols=True)
    while step < stage.steps and time.monotonic() - start < stage.minutes * 60:
        loss = step_fn(step)
        smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{smoothed:.4f}")
        if checkpoint.due():
            checkpoint.save(snapshot())
    bar.close()
    elapsed = time.monotonic() - start
    checkpoint.save(snapshot())
    if step < stage.steps:
        log.warning("%s stopped by its %.1f min budget at step %d of %d", stage.name, stage.minutes, step, stage.steps)
    return {"stage": stage.name, "steps": step, "planned_steps": stage.steps, "seconds": round(elapsed, 1),
            "final_loss": smoothed}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_images(tensor: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    scaled = ((tensor.clamp(-1, 1) + 1) * 127.5).round()
    return scaled.permute(0, 2, 3, 1).to(torch.uint8).numpy()


# ---------------------------------------------------------------- stage 1: VAE


def train_vae(vae: AutoencoderKL, images: torch.Tensor, stage: Stage, work_dir: Path, seed: int) -> dict:
    """Reconstruction (L1 + MSE) plus a small KL term; no perceptual or adversarial loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=0.0)
    vae.train()

    def step_fn(step: int) -> float:
        batch = images[torch.randint(0, len(images), (stage.batch,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + KL_WEIGHT * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(stage, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    modules = {"vae": vae, "optimizer": optimizer}
    report = run_stage(stage, modules, step_fn, Checkpoint(work_dir / "vae.pt"), generator)
    vae.eval()
    return report


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, so stage 2 never runs the encoder."""
    means, stds = [], []
    for chunk in images.split(batch):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_check(vae: AutoencoderKL, images: np.ndarray, labels: list) -> dict:
    """Reconstruction PSNR and classifier accuracy on held-out images: the ceiling for generated images."""
    recon = to_images(vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample)
    mse = np.mean((recon.astype(np.float64) - images) ** 2)
    accuracy = np.mean([classify(image) == label for image, label in zip(recon, labels)])
    return {"psnr_db": round(10 * math.log10(255**2 / mse), 2), "classifier_accuracy_on_reconstructions": accuracy}


# ---------------------------------------------------------------- stage 2: UNet + text encoder


def tokenize_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=architecture.TOKENIZER_MAX_LENGTH,
                     truncation=True, return_tensors="pt").input_ids


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """min(SNR, gamma) / SNR per sample, the Min-SNR weighting for an eps-prediction loss."""
    alpha_bar = alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=MIN_SNR_GAMMA) / snr


def train_unet(models: dict, latents: tuple, token_ids: torch.Tensor, stage: Stage, work_dir: Path, seed: int) -> dict:
    """Epsilon prediction (with offset noise) on SD's DDPM schedule, text encoder trained jointly, EMA of both saved."""
    unet, text, ema_unet, ema_text = models["unet"], models["text"], models["ema_unet"], models["ema_text"]
    means, stds, empty_ids = latents[0], latents[1], token_ids[-1]
    noise_schedule = DDPMScheduler(**{k: architecture.SD15_SCHEDULER[k] for k in
                                      ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    alphas_cumprod = noise_schedule.alphas_cumprod
    scaling = models["scaling_factor"]
    generator = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)  # no decay: unused vocab rows stay put

    def step_fn(step: int) -> float:
        index = torch.randint(0, len(means), (stage.batch,), generator=generator)
        noise_latent = torch.randn(means[index].shape, generator=generator)
        clean = (means[index] + stds[index] * noise_latent) * scaling
        ids = token_ids[index]
        drop = torch.rand(stage.batch, generator=generator) < EMPTY_CAPTION_RATE
        ids = torch.where(drop[:, None], empty_ids, ids)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (stage.batch,), generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        noise = noise + OFFSET_NOISE * torch.randn((*clean.shape[:2], 1, 1), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, text(ids)[0]).sample
        per_sample = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(alphas_cumprod, timesteps)).mean()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(stage, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_update(ema_unet, unet, step)
        ema_update(ema_text, text, step)
        return loss.item()

    modules = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text, "optimizer": optimizer}
    unet.train()
    text.train()
    return run_stage(stage, modules, step_fn, Checkpoint(work_dir / "unet.pt"), generator)


# ---------------------------------------------------------------- CLI


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/sdrt-shapes"))
    parser.add_argument("--work-dir", type=Path, default=Path("out/train-shapes"), help="checkpoints and logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work-dir")
    parser.add_argument("--images", type=int, default=12000, help="training set size")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--unet-lr", type=float, default=7e-4)
    parser.add_argument("--minutes", type=float, default=35.0, help="time budget per stage")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        for stale in ("vae.pt", "unet.pt"):
            (args.work_dir / stale).unlink(missing_ok=True)
    arch = architecture.SmallSD()
    started = time.monotonic()
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "architecture": asdict(arch)}

    t = time.monotonic()
    images, labels = make_dataset(args.images, args.seed)
    pixels = to_tensor(images)
    report["data_seconds"] = round(time.monotonic() - t, 1)

    vae = seeded(args.seed, lambda: architecture.vae(arch))
    vae_stage = Stage("vae", args.vae_steps, args.vae_batch, args.vae_lr, args.minutes)
    report["vae"] = train_vae(vae, pixels, vae_stage, args.work_dir, args.seed)
    held_images, held_labels = make_dataset(HELD_OUT_IMAGES, args.seed + HELD_OUT_SEED_OFFSET)
    report["vae"].update(vae_check(vae, held_images, held_labels))
    log.info("vae: %s", report["vae"])

    t = time.monotonic()
    means, stds = encode_all(vae, pixels)
    sampled = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(args.seed))
    scaling_factor = float(1.0 / sampled.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    report["encode_seconds"] = round(time.monotonic() - t, 1)
    report["scaling_factor"] = scaling_factor

    architecture.write_tokenizer(args.work_dir / "tokenizer")
    tokenizer = architecture.load_tokenizer(args.work_dir / "tokenizer")
    token_ids = tokenize_captions(tokenizer, [label.caption for label in labels] + [""])
    text = seeded(args.seed + 1, lambda: architecture.text_encoder(arch))
    unet = seeded(args.seed + 2, lambda: architecture.unet(arch))
    models = {"unet": unet, "text": text, "ema_unet": copy.deepcopy(unet), "ema_text": copy.deepcopy(text),
              "scaling_factor": scaling_factor}
    unet_stage = Stage("unet", args.unet_steps, args.unet_batch, args.unet_lr, args.minutes)
    report["unet"] = train_unet(models, (means, stds), token_ids, unet_stage, args.work_dir, args.seed + 3)

    architecture.save_pipeline(args.out, models["ema_text"].eval(), vae, models["ema_unet"].eval())
    report["total_seconds"] = round(time.monotonic() - started, 1)
    report["parameters"] = {name: architecture.parameter_count(m) for name, m in
                            (("text_encoder", text), ("unet", unet), ("vae", vae))}
    (args.work_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
