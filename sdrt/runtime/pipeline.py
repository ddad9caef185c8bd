"""Text-to-image on a bundle: prompt -> embeddings -> denoising loop (a generator of steps) -> decoded images."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from sdrt import __version__
from sdrt.backends import Backend, Session, get_backend
from sdrt.bundle import Manifest, read_manifest, verify_files
from sdrt.errors import BundleError
from sdrt.runtime.guidance import ClassifierFreeGuidance
from sdrt.runtime.image import infotext, to_pil
from sdrt.runtime.img2img import (
    Encoder, Start, extra_unet_channels, image_array, img2img_start, inpaint_start, txt2img_start,
)
from sdrt.runtime.masks import InpaintArea, inpaint_area, mask_array
from sdrt.runtime.noise import PerImageNoise
from sdrt.runtime.parametrization import c_in, parametrization
from sdrt.runtime.preview import linear_preview, tiny_decoder_preview
from sdrt.runtime.prompts import prompt_embeddings
from sdrt.runtime.request import GenerationRequest, scheduler_settings
from sdrt.runtime.cfg_rescale import rescale_noise_cfg
from sdrt.runtime.safety import SafetyChecker, blacken
from sdrt.runtime.samplers import make_schedule, sample, sampler_label, schedule_label
from sdrt.runtime.schedules import Schedule
from sdrt.runtime.tokenizer import ClipTokenizer
from sdrt.runtime.watermark import fits_watermark, embed_watermark, watermark_payload

log = logging.getLogger(__name__)

# Components txt2img needs at load; others (vae_encoder) open on first use.
TXT2IMG = ("text_encoder", "unet", "vae_decoder")
SD_VAE_SCALE = 0.18215  # the scaling factor of the VAE SD 1.x and 2.x ship (their vae/config.json)


def default_bundle() -> Path:
    """The small trained model that ships inside the package."""
    return Path(__file__).resolve().parent.parent / "models" / "sdrt-shapes"


@dataclass(frozen=True)
class Step:
    """Progress of the loop: `index` steps of `total` are done; `latents` is the sample (k-diffusion VE scale)."""

    index: int
    total: int
    sigma: float
    latents: np.ndarray

    def vp_latents(self) -> np.ndarray:
        """The sample on the scale the VAE decodes (what diffusers' VP schedulers would hold)."""
        return (self.latents / np.sqrt(self.sigma**2 + 1.0)).astype(np.float32)


@dataclass(frozen=True)
class GeneratedImage:
    """One output image with its seed, A1111-style parameters text and what post-processing did to it."""

    image: Image.Image
    seed: int
    parameters: str
    nsfw: bool = False  # flagged by the bundle's safety checker: `image` is black
    watermark: str | None = None  # the invisible watermark's payload, when one was embedded

    def save(self, path: Path | str) -> Path:
        """Write the image (.png, .jpg or .webp) with its parameters where A1111 keeps them, atomically."""
        from sdrt.runtime.outputs import write_image

        return write_image(self.image, Path(path), self.parameters)


def _unet_feeds(x_in: np.ndarray, t: float, context: np.ndarray) -> dict[str, np.ndarray]:
    timestep = np.full(len(x_in), t, dtype=np.float32)
    return {"sample": x_in, "timestep": timestep, "encoder_hidden_states": context}


class Pipeline:
    """A loaded bundle on one backend; `denoise` yields steps, `generate` returns finished images."""

    def __init__(self, root: Path, manifest: Manifest, backend: Backend):
        self.root, self.manifest, self.backend = root, manifest, backend
        tok = manifest.tokenizer
        self.tokenizer = ClipTokenizer.from_files(
            root / tok.vocab, root / tok.merges, max_length=tok.max_length, pad_token=tok.pad_token
        )
        self.denoised_from = parametrization(manifest.model.prediction_type)
        self._sessions: dict[str, Session] = {}
        for name in TXT2IMG:
            self.session(name)

    @classmethod
    def load(cls, bundle: Path | str | None = None, backend: str | None = None, verify: bool = True, **options):
        """Read and verify a bundle (default: the shipped model) and open its components on a backend."""
        root = Path(bundle) if bundle is not None else default_bundle()
        manifest = read_manifest(root)
        if verify:
            verify_files(root, manifest)
        formats = {c.format for c in manifest.components.values()}
        return cls(root, manifest, get_backend(backend, formats=formats, **options))

    def session(self, name: str) -> Session:
        """The component's session, opened on first use."""
        if name not in self._sessions:
            if name not in self.manifest.components:
                raise BundleError(f"bundle {self.root} has no {name} component")
            self._sessions[name] = self.backend.load(self.root, self.manifest.components[name])
        return self._sessions[name]

    def prepared(self, name: str, feeds: dict[str, np.ndarray]) -> Session:
        """The session, with `feeds` checked against its contract and its shapes fixed to theirs.

        Called once per shape at the boundary (never inside the loop): static-shape engines compile here.
        """
        session = self.session(name)
        session.prepare(session.contract.check_inputs(feeds))
        return session

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode_prompts(self, prompts: list[str]) -> np.ndarray:
        """A1111 prompts (attention syntax, BREAK, any length) -> hidden states [len(prompts), 77 * chunks, dim]."""
        return prompt_embeddings(self.tokenizer, self._encode_ids, prompts)

    def _encode_ids(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [n, 77] -> text encoder hidden states [n, 77, dim]."""
        feeds = {"input_ids": ids.astype(np.int32)}
        return self.prepared("text_encoder", feeds).run(feeds)["last_hidden_state"]

    def _guidance(self, req: GenerationRequest) -> ClassifierFreeGuidance:
        b = req.batch_size
        embeddings = self.encode_prompts(req.negative_prompts() + req.prompts())
        return ClassifierFreeGuidance(cond=embeddings[b:], uncond=embeddings[:b], scale=req.guidance_scale)

    def _model(self, guidance: ClassifierFreeGuidance, start: Start, rescale: float):
        """The denoiser D(x, sigma, t) the samplers call: scale input, append the start's extra channels (after the
        scaling, as diffusers' inpaint pipeline does), guided UNet, prediction -> denoised."""
        context = guidance.context()
        channels = guidance.batch(start.unet_channels().astype(np.float32))
        extra = {name: guidance.batch(value) for name, value in start.feeds.items()}

        def feeds(x: np.ndarray, sigma: float, t: float) -> dict[str, np.ndarray]:
            x_in = np.concatenate([guidance.batch((x * c_in(sigma)).astype(np.float32)), channels], axis=1)
            return {**_unet_feeds(x_in, t, context), **extra}

        unet = self.prepared("unet", feeds(start.latents, 0.0, 0.0))

        def model(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
            out = unet.run(feeds(x, sigma, t))["model_output"]
            guided = guidance.combine(out)
            if rescale and guidance.enabled:  # on the eps / v output, where diffusers applies it
                guided = rescale_noise_cfg(guided, np.split(out, 2)[1], rescale)
            return self.denoised_from(x, guided, sigma)

        return model

    def latent_shape(self, req: GenerationRequest) -> tuple[int, int, int, int]:
        f, m = self.manifest.model.vae_scale_factor, self.manifest.model
        return (req.batch_size, m.latent_channels, req.height // f, req.width // f)

    def denoise(self, request: GenerationRequest) -> Iterator[Step]:
        """The denoising loop as a generator: one Step per sampler step; stop iterating to cancel."""
        req = request.resolve(self.manifest)
        noise = PerImageNoise(req.seed, req.batch_size, req.seed_mode)
        schedule = self.schedule(req)
        start = self.start(req, noise, schedule)
        model = self._model(self._guidance(req), start, req.guidance_rescale)
        steps = sample(req.sampler, model, start.latents, schedule, noise, eta=req.eta)
        x, total = next(steps), schedule.steps
        for i in range(1, total + 1):
            sigma = float(schedule.sigmas[i])
            x = start.blend(x, sigma, i == total)
            yield Step(i, total, sigma, x)
            if i < total:
                x = steps.send(x)  # the sampler continues from the blended latents (samplers_basic.emit)

    def schedule(self, req: GenerationRequest) -> Schedule:
        """Noise levels and timesteps of a resolved request (cut by img2img's strength); `.steps` counts model
        evaluations."""
        config = scheduler_settings(self.manifest, req.kind)
        return make_schedule(req.sampler, config, req.steps, 1.0 if req.strength is None else req.strength)

    def start(self, req: GenerationRequest, noise: PerImageNoise, schedule: Schedule) -> Start:
        """What the loop starts from: noise, or the init image's latents (img2img, inpainting)."""
        shape = self.latent_shape(req)
        if req.init_image is None:
            return txt2img_start(noise, shape, schedule)
        area = self.area(req)
        image, encode = image_array(area.image), self._encoder(req.batch_size, noise)
        if area.mask is None:
            return img2img_start(encode, image, noise, shape, schedule)
        conditioned = extra_unet_channels(self.manifest) > 0
        return inpaint_start(encode, image, mask_array(area.mask), noise, shape, schedule, req.strength == 1.0,
                             conditioned)

    def area(self, req: GenerationRequest) -> InpaintArea:
        """Where a resolved img2img / inpaint request generates, and how its output goes back (A1111's options)."""
        return inpaint_area(req.init_image, req.mask, req.width, req.height, req.mask_blur, req.inpaint_full_res,
                            req.inpaint_full_res_padding)

    def _encoder(self, batch: int, noise: PerImageNoise) -> Encoder:
        """image [1, 3, H, W] -> scaled latents for each image of the batch, each sampled with its own generator
        (diffusers' img2img: latent_dist.sample(generator[i]) of the image repeated to the batch)."""
        scale = np.float32(self.manifest.model.latent_scale_factor)

        def encode(image: np.ndarray) -> np.ndarray:
            out = self.prepared("vae_encoder", {"image": image}).run({"image": image})
            mean, std = (np.repeat(out[name], batch, axis=0) for name in ("latent_mean", "latent_std"))
            return (mean + std * noise(mean.shape)) * scale

        return encode

    def decode(self, latents: np.ndarray, fast: bool = False) -> list[Image.Image]:
        """Decode VP-scale latents one image at a time (bounds peak memory at large sizes): the VAE, or with
        `fast` the bundle's tiny decoder (TAESD), which takes the latents unscaled."""
        name = "taesd_decoder" if fast else "vae_decoder"
        scale = 1.0 if fast else self.manifest.model.latent_scale_factor
        scaled = (latents / scale).astype(np.float32)
        decoder = self.prepared(name, {"latents": scaled[:1]})
        return [img for z in scaled for img in to_pil(decoder.run({"latents": z[None]})["image"])]

    def preview(self, step: Step) -> list[Image.Image]:
        """Pictures of a step's latents: the tiny decoder (TAESD) when the bundle has one; for SD's own VAE a linear
        latent -> RGB map at latent resolution (no network); for any other VAE the VAE itself, since no cheap map
        is known for it (on the shipped model a least-squares linear map is no closer than flat grey)."""
        latents = step.vp_latents()
        if "taesd_decoder" in self.manifest.components:
            return tiny_decoder_preview(self.prepared("taesd_decoder", {"latents": latents[:1]}), latents)
        if self.manifest.model.latent_scale_factor == SD_VAE_SCALE:  # SD 1.x and 2.x share this VAE
            return linear_preview(latents)
        return self.decode(latents)

    def generate(self, request: GenerationRequest | str | list[str], **fields) -> list[GeneratedImage]:
        """Run a whole request (sdrt.runtime.driver): a GenerationRequest, or a prompt (or a list of prompts) with
        request fields, diffusers' names accepted where they mean the same (`num_inference_steps`,
        `num_images_per_prompt`, `image`, `mask_image`, a per-step `callback` that returns True to stop); an
        `init_image` or `mask` may be a path."""
        from sdrt.runtime.api import request_from_kwargs
        from sdrt.runtime.driver import run

        request, hook = request_from_kwargs(request, fields)
        return list(run(self, request, hook))

    def finish(self, req: GenerationRequest, images: list[Image.Image]) -> list[GeneratedImage]:
        """Decoded images -> outputs: pasted into the init image where A1111 would (a mask blur, "only masked"),
        checked by the bundle's safety checker (flagged images blacked out, as diffusers does), then watermarked
        as the SD reference scripts do (after the check, every image)."""
        if req.init_image is not None:
            area = self.area(req)
            images = [area.paste(img) for img in images]
        checked = self._safety_checker is not None and req.safety_checker
        flags = self._safety_checker.check(images) if checked else [False] * len(images)
        images = blacken(images, flags)
        payload = watermark_payload(self.manifest) if req.watermark else None
        marked = [payload is not None and fits_watermark(img.size) for img in images]
        images = [embed_watermark(img, payload) if mark else img for img, mark in zip(images, marked)]
        return [
            GeneratedImage(img, req.seed + i, self.parameters(req, i, flag if checked else None, mark),
                           nsfw=flag, watermark=payload.decode() if mark else None)
            for i, (img, flag, mark) in enumerate(zip(images, flags, marked))
        ]

    @functools.cached_property
    def _safety_checker(self) -> SafetyChecker | None:
        component = self.manifest.components.get("safety_checker")
        return None if component is None else SafetyChecker.from_pipeline_session(self.session(component.name),
                                                                                  component)

    def parameters(
        self, req: GenerationRequest, index: int, nsfw: bool | None = None, watermarked: bool = False
    ) -> str:
        """A1111 infotext for image `index` of a resolved batch; `nsfw` None: the safety checker did not run."""
        seed = req.seed + index
        source = self.manifest.source
        has_checker = "safety_checker" in self.manifest.components
        fields = {
            "Steps": req.steps,
            "Sampler": sampler_label(req.sampler),
            "Schedule type": schedule_label(req.sampler),
            "CFG scale": f"{req.guidance_scale:g}",
            "Seed": seed,
            "Size": f"{req.width}x{req.height}",
            "RNG": "CPU" if req.seed_mode == "cpu" else None,  # A1111 writes it when not its default GPU source
            "Model hash": source.get("sha256", "")[:10],
            "Model": self.manifest.model.name,
            "Denoising strength": None if req.init_image is None else f"{req.strength:g}",
            "Mask blur": req.mask_blur or None,
            "Inpaint area": "Only masked" if req.mask is not None and req.inpaint_full_res else None,
            "Masked area padding": req.inpaint_full_res_padding if req.mask is not None and req.inpaint_full_res
            else None,
            "Eta": None if req.eta is None else f"{req.eta:g}",
            "CFG Rescale phi": f"{req.guidance_rescale:g}" if req.guidance_rescale else None,
            "Model kind": None if req.kind == "standard" else req.kind,
            "VAE Decoder": "TAESD" if req.fast_decode else None,  # A1111's name for the TAESD choice
            "Safety checker": None if not has_checker else "off" if nsfw is None else "flagged" if nsfw
            else "passed",
            "Watermark": watermark_payload(self.manifest).decode() if watermarked else
            "off" if not req.watermark else "none (image under 256x256)",
            "Backend": self.backend.label,
            "Version": f"sdrt {__version__}",
        }
        return infotext(req.prompts()[index], req.negative_prompts()[index], fields)
